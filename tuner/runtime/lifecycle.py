"""What a run gets beside training: its lifecycle callbacks (EMA, validation, export and model card, Hub,
webhook, the user's own), what the model card shows, and the LoRA formats it writes. Used by tuner/run.py."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("tuner")


def lycoris_load_snippet(family) -> str:
    """How a user applies the exported LyCORIS file, with the library's own loader (the card's snippet)."""
    from models.trainable import lycoris_prefix

    prefix = lycoris_prefix(family.denoiser_name)
    return (
        "from lycoris import LycorisNetwork, create_lycoris_from_weights\n"
        f'LycorisNetwork.apply_preset({{{{"lora_prefix": "{prefix}"}}}})  # the file\'s key prefix\n'
        f'lycoris, _ = create_lycoris_from_weights(1.0, {{path!r}} + "/pytorch_lora_weights.safetensors", '
        f"pipe.{family.denoiser_name})\n"
        "lycoris.merge_to()"
    )


def card_info(cfg: DictConfig, datamodule, validation_prompts: dict[str, str]) -> dict:
    """What the model card shows, from the settled config and the scanned data (no secrets in either)."""
    from models.base import pipeline_name
    from models.noise import run_scheduler_change
    from tuner.config.families import run_class

    model, data = cfg.model, cfg.data
    family = run_class(model)
    datasets = []
    for name, result in getattr(datamodule, "results", {}).items():
        spec = datamodule.specs[name]
        datasets.append(
            {
                "name": name,
                "images": len(result.usable),
                "buckets": len({s.bucket for s in result.usable}),
                "resolution": f"{spec['resolution']} ({spec['resolution_type']})",
                "repeats": spec["repeats"],
            }
        )
    # a family whose checkpoint decides its pipeline and licence (FLUX.2: dev or klein, 4B or 9B) reads them there
    checkpoint = family.checkpoint_card(model) if hasattr(family, "checkpoint_card") else {}
    return {
        "family": model.family,
        "finetune": model.finetune,
        "base_model": model.pretrained_model_name_or_path,
        "license": cfg.callbacks.hub.license or checkpoint.get("license") or family.license,
        "license_note": family.license_note,
        "family_notes": family.card_notes(model),  # how to sample it as it was trained (family-specific)
        "task": "image-to-image" if family.conditioning_kinds else "text-to-image",
        "pipeline": checkpoint.get("pipeline") or pipeline_name(family),  # for the card's loading snippet
        # the scheduler validation sampled with, as a change to the base model's (a LoRA's snippet sets it)
        "scheduler": run_scheduler_change(family.noise_schedule, model),
        "lora_load": lycoris_load_snippet(family) if model.finetune == "lycoris" else family.lora_load_snippet,
        # a two-expert run: one LoRA per expert, and how to sample with both (the card's snippet)
        "experts": {
            "boundary": model.expert_boundary,
            "timestep_scale": family.denoiser_timestep_scale,
            "denoiser": family.denoiser_name,
            "denoisers": family.checkpoint_experts(model),  # Wan 2.2 A14B: an expert per transformer
        }
        if model.experts
        else None,
        "instance_prompt": data.instance_prompt,
        "validation_prompts": validation_prompts,
        "epochs": cfg.num_train_epochs,
        "learning_rate": cfg.optimizer.lr,
        "lr_scheduler": str(cfg.lr_scheduler._target_).rsplit(".", 1)[-1],
        "warmup_steps": cfg.lr_scheduler.warmup_steps,
        "batch_size": data.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "mixed_precision": cfg.mixed_precision,
        "optimizer": str(cfg.optimizer._target_).rsplit(".", 1)[-1],
        "lycoris": OmegaConf.to_container(model.lycoris) if model.finetune == "lycoris" else None,
        "lora_rank": model.lora.rank if model.finetune == "lora" else None,
        "lora_alpha": (model.lora.alpha or model.lora.rank) if model.finetune == "lora" else None,
        "quantization": dict(cfg.quantization),
        "caption_dropout_probability": data.caption_dropout_probability,
        "datasets": datasets,
    }


def validation_callback(cfg: DictConfig, output_dir: Path):
    from callbacks.validation import Validation

    val = cfg.callbacks.validation
    side = int(val.resolution or (cfg.data.resolution if cfg.data.resolution >= 16 else 1024))
    return Validation(
        str(output_dir),
        every_n_steps=val.every_n_steps,
        prompts=list(val.prompts),
        prompt_library=val.prompt_library,
        negative_prompt=val.negative_prompt,
        guidance_scale=val.guidance_scale,
        num_inference_steps=val.num_inference_steps,
        width=side,
        height=side,
        seed=val.seed,
        use_ema=val.use_ema,
        loss_batches=val.loss_batches,
        loss_levels=tuple(val.loss_levels),
        loss_timesteps=tuple(val.loss_timesteps) if val.loss_timesteps else None,
        inputs=list(val.inputs),
        fps=val.fps or cfg.data.get("frame_rate") or 16.0,
    )


def lifecycle_callbacks(cfg: DictConfig, output_dir: Path, datamodule=None) -> list:
    """EMA, validation, the final export + model card, Hub upload and the webhook, as configured."""
    from callbacks.checkpoints import FinalExport

    out = []
    ema = cfg.callbacks.ema
    if ema.enabled:
        from callbacks.ema import EMA

        out.append(EMA(ema.decay, ema.warmup, ema.update_every_n_steps, ema.on_cpu))
    prompts: dict[str, str] = {}
    if cfg.callbacks.validation.enabled:
        validation = validation_callback(cfg, output_dir)
        prompts = dict(validation.prompts)
        if ema.enabled and validation.use_ema != "live":  # the EMA's images are named <shortname>_ema
            prompts.update({f"{k}_ema": f"{v} (EMA weights)" for k, v in validation.prompts.items()})
        out.append(validation)
    info = card_info(cfg, datamodule, prompts)
    out.append(FinalExport(output_dir, info))  # before the Hub callback, which pushes what it writes
    hub = cfg.callbacks.hub
    if hub.push_to_hub:
        from callbacks.hub import HubUploadCallback

        out.append(
            HubUploadCallback(
                output_dir, hub.model_name, hub.push_checkpoints, hub.private, hub.endpoint, card_info=info
            )
        )
    hook = cfg.callbacks.webhook
    if hook.config:
        from callbacks.webhook import WebhookCallback

        summary = {
            k: info[k] for k in ("family", "finetune", "base_model", "learning_rate", "batch_size", "mixed_precision")
        }
        summary.update(max_train_steps=cfg.max_train_steps, images=sum(d["images"] for d in info["datasets"]))
        out.append(
            WebhookCallback(
                hook.config,
                hook.status_every_n_steps,
                run_summary=summary,
                default_prefix=output_dir.name,
                close_timeout=hook.exit_timeout,
            )
        )
    for name, spec in cfg.callbacks.extra.items():  # the user's own, checked before load (tuner/config/__init__.py)
        log.info("callback %s: %s", name, spec._target_)
        out.append(instantiate(spec))
    return out


def configure_export(module, cfg: DictConfig, datamodule, output_dir: Path) -> None:
    """The LoRA formats the run writes beside diffusers' (kohya's: its file name and ss_* metadata)."""
    module.lora_formats = [str(f) for f in cfg.export.lora_formats]
    if "kohya" in module.lora_formats:
        from models.export import kohya_metadata

        module.kohya_name = cfg.export.name or output_dir.name
        images = len(datamodule.samples)
        module.kohya_metadata = kohya_metadata(cfg, type(module), images)
