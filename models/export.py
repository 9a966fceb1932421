"""Writing trained weights in diffusers format: the LoRA file or the whole pipeline, named after the
family's denoiser (``unet`` / ``transformer``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def save_weights(module: Any, directory: str | Path, full_pipeline: bool = True, suffix: str = "") -> Path:
    """LoRA: ``<dir>/pytorch_lora_weights<suffix>.safetensors``. Full: ``<dir>/pipeline<suffix>/`` (the
    whole pipeline), or ``<dir>/<denoiser><suffix>/`` alone when ``full_pipeline`` is false (checkpoints)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hp = module.hparams
    if hp.finetune == "lycoris":
        return save_lycoris(module, directory / f"pytorch_lora_weights{suffix}.safetensors")
    if hp.finetune == "lora":
        paths = []
        for adapter, tag in module.lora_adapters():  # one file per split-schedule expert in a two-expert run
            name = f"pytorch_lora_weights{tag}{suffix}.safetensors"
            module.pipeline_class.save_lora_weights(
                directory, **module.lora_layers(adapter), weight_name=name, safe_serialization=True
            )
            paths.append(respect_umask(directory / name))
            if "kohya" in getattr(module, "lora_formats", ()):
                save_kohya(module, adapter, directory / f"{module.kohya_name}{tag}{suffix}.safetensors")
        return paths[0]
    if full_pipeline:
        # The frozen parts are written from the base checkpoint at its own precision, not from the
        # copies loaded for training; only the trained denoiser comes from memory.
        pipe = module.pipeline_class.from_pretrained(
            hp.pretrained_model_name_or_path,
            **{module.denoiser_slot(): module.denoiser},  # an A14B expert's run: into its own transformer
            scheduler=module.noise.sampling_scheduler(),
            revision=hp.revision,
            variant=hp.variant,
            **module.pipeline_load_overrides(),
        )
        pipe.save_pretrained(directory / f"pipeline{suffix}", safe_serialization=True)
        return respect_umask(directory / f"pipeline{suffix}")
    module.denoiser.save_pretrained(directory / f"{module.denoiser_name}{suffix}", safe_serialization=True)
    return respect_umask(directory / f"{module.denoiser_name}{suffix}")


def save_lycoris(module: Any, path: Path) -> Path:
    """The LyCORIS network in the library's own file format (what its ``create_lycoris_from_weights``, A1111
    and ComfyUI read), its settings in the metadata as kohya's fields name them."""
    import json

    import torch

    settings = {k: v for k, v in dict(module.hparams.lycoris or {}).items()}
    metadata = {
        **getattr(module, "kohya_metadata", {}),
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(settings.get("rank")),
        "ss_network_alpha": str(settings.get("alpha")),
        "ss_network_args": json.dumps({"algo": settings.get("algo"), "factor": settings.get("factor")}),
        "lycoris_prefix": module.lycoris_prefix,
        "ss_steps": str(module.global_step),
    }
    module.lycoris_net.save_weights(str(path), torch.float32, metadata)
    return respect_umask(path)


def save_kohya(module: Any, adapter: str, path: Path) -> Path:
    """One adapter in kohya's LoRA layout (``lora_unet_<module path>.lora_down/.lora_up/.alpha``), which
    A1111/Forge, ComfyUI and CivitAI read, with the training settings as kohya's ``ss_*`` metadata. Keys
    by diffusers' own converter; ``.alpha`` set to the trained alpha (the converter writes the rank)."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    host = module.adapter_host(adapter)
    config = host.peft_config[adapter]
    layers = get_peft_model_state_dict(host, adapter_name=adapter)
    layers = {f"unet.{k}": v for k, v in layers.items()}
    for encoder, encoder_layers in module.text_encoder_lora_layers().items():  # -> lora_te1_ / lora_te2_
        layers.update({f"{encoder}.{k}": v for k, v in encoder_layers.items()})
    state = convert_state_dict_to_kohya({k: v.detach().contiguous() for k, v in layers.items()})
    if len(module.text_encoder_lora_targets) == 1:  # kohya names a family's one text encoder lora_te_ (SD 1.x/2.x)
        state = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in state.items()}
    for key in state:
        if key.endswith(".alpha"):
            state[key] = torch.tensor(float(config.lora_alpha))
    metadata = {**getattr(module, "kohya_metadata", {}), "ss_network_dim": str(config.r)}
    metadata.update(ss_network_alpha=str(config.lora_alpha), ss_steps=str(module.global_step))
    save_file(state, str(path), metadata=metadata)
    return respect_umask(path)


def kohya_metadata(cfg: Any, family_cls: type, images: int) -> dict[str, str]:
    """kohya's ``ss_*`` training fields (strings) from the run's config, as A1111 and CivitAI show them."""
    from models.trainable import base_record

    model, data = cfg.model, cfg.data
    source = base_record(model.pretrained_model_name_or_path)  # a single-file base: the file's name, as kohya's
    text_encoders = model.lora.get("text_encoders")
    fields = {
        "ss_network_module": "networks.lora",
        "ss_base_model_version": family_cls.kohya_base_versions.get(model.family, model.family),
        "ss_sd_model_name": Path(source["file"]).name if source else model.pretrained_model_name_or_path,
        "ss_v2": str(model.family == "sd2"),
        "ss_learning_rate": cfg.optimizer.lr,
        "ss_unet_lr": cfg.optimizer.lr,
        "ss_text_encoder_lr": (model.lora.get("text_encoder_lr") or cfg.optimizer.lr) if text_encoders else 0,
        "ss_network_train_unet_only": not text_encoders,
        "ss_lr_scheduler": str(cfg.lr_scheduler._target_).rsplit(".", 1)[-1],
        "ss_lr_warmup_steps": cfg.lr_scheduler.get("warmup_steps", 0),
        "ss_optimizer": str(cfg.optimizer._target_),
        "ss_max_train_steps": cfg.max_train_steps,
        "ss_num_epochs": cfg.num_train_epochs,
        "ss_batch_size_per_device": data.batch_size,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_seed": cfg.seed,
        "ss_resolution": f"({data.resolution}, {data.resolution})",
        "ss_num_train_images": images,
        "ss_caption_dropout_rate": data.caption_dropout_probability,
        "ss_noise_offset": model.noise_offset,
        "ss_min_snr_gamma": model.min_snr_gamma,
        "ss_loss_type": getattr(model.loss_type, "value", model.loss_type),  # kohya's names: l2, huber, smooth_l1
        "ss_huber_c": model.huber_c,
        "ss_huber_schedule": getattr(model.huber_schedule, "value", model.huber_schedule),
        "ss_network_dropout": model.lora.dropout,
        "ss_training_comment": "trained with tuner",
    }
    return {k: str(v) for k, v in fields.items() if v is not None}


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)  # no /proc: read it by setting it (and put it straight back)
        os.umask(mask)
        return mask


def respect_umask(path: Path) -> Path:
    """safetensors writes its files 0600 whatever the umask; give them the mode any other file gets, so
    that other users of a shared cluster can read the results."""
    mode = 0o666 & ~_umask()
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        os.chmod(file, mode)
    return path
