"""What trains and in which precision: the load-time dtype plan, quantisation of the frozen weights,
and LoRA (peft) or full fine-tuning of the denoiser.

Weights load in their training dtype (``torch_dtype`` at ``from_pretrained``), so a 12 B denoiser or
T5-XXL is never held in fp32 first and T5's ``_keep_in_fp32_modules`` survive; a quantised module is
never cast afterwards (diffusers refuses that for bitsandbytes, and it would undo quanto's packing).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # model.weight_dtype: the trained weights' dtype


def dtype_plan(
    names: list[str], denoiser: str, finetune: str, mixed_precision: str, vae_in_fp32: bool, trained=torch.float32
) -> dict[str, torch.dtype]:
    """The dtype each module loads in: frozen ones in the mixed-precision dtype (the VAE in fp32 when the
    family needs it), a fully fine-tuned denoiser in ``trained`` (``model.weight_dtype``: fp32 master weights,
    autocast doing the rest, or bf16 ones)."""
    weight = DTYPES[mixed_precision]
    plan = {}
    for name in names:
        if name.startswith("tokenizer"):
            continue
        if name == denoiser:
            plan[name] = weight if finetune == "lora" else trained
        elif name == "vae":
            plan[name] = torch.float32 if vae_in_fp32 else weight
        else:
            plan[name] = weight
    return plan


def load_kwargs(cls: type, dtype: torch.dtype | None, common: dict, quantization_config=None) -> dict:
    """``from_pretrained`` keywords for one component: transformers calls the dtype ``dtype``, diffusers
    ``torch_dtype``; tokenizers take neither. nf4 quantisation is applied while loading."""
    kwargs = dict(common)
    if dtype is not None:
        transformers_model = any(base.__module__.startswith("transformers.") for base in cls.__mro__)
        kwargs["dtype" if transformers_model else "torch_dtype"] = dtype  # (Kolors' ChatGLM lives in diffusers)
    else:
        kwargs.pop("variant", None)  # tokenizers have no weight variants
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return kwargs


def lycoris_prefix(denoiser_name: str) -> str:
    """The key prefix of LyCORIS files: kohya's ``lora_unet`` for UNets (A1111/Forge and ComfyUI map it onto
    the UNet), the library's own ``lycoris`` for transformers (ComfyUI's mapping, SimpleTuner's files)."""
    return "lora_unet" if denoiser_name == "unet" else "lycoris"


def lycoris_network(
    denoiser: torch.nn.Module, settings: dict, targets: list[str], prefix: str, dtype=torch.float32
) -> torch.nn.Module:
    """A LyCORIS network (``model.lycoris``: LoKr or LoHa) on the denoiser's target layers, through the
    lycoris-lora library, applied (its modules wrap the targets' forward) and trainable in ``dtype``."""
    from lycoris import LycorisNetwork

    # The library keeps its targeting as class state: set all of it, every time.
    LycorisNetwork.apply_preset(
        {
            "target_module": [],
            "target_name": [f"*.{t}" for t in targets] + list(targets),
            "use_fnmatch": True,
            "module_algo_map": {},
            "name_algo_map": {},
            "exclude_name": [],
            "enable_conv": False,
            "lora_prefix": prefix,
        }
    )
    rank = int(settings.get("rank", 10000))
    network = LycorisNetwork(
        denoiser,
        multiplier=1.0,
        lora_dim=rank,
        conv_lora_dim=0,
        alpha=float(settings.get("alpha") or 1.0),
        dropout=float(settings.get("dropout") or 0.0),
        network_module=str(settings.get("algo") or "lokr"),
        factor=int(settings.get("factor") or -1),
        warn_on_unmatched=True,
    )
    if not network.loras:
        raise ValueError(f"model.finetune=lycoris: no layer of the denoiser matched the targets {targets}")
    network.apply_to()
    network.to(dtype).requires_grad_(True)
    return network


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether any weight of ``module`` is a quantised tensor (quanto or bitsandbytes)."""
    if getattr(module, "is_quantized", False) or getattr(module, "quantization_method", None):
        return True
    return any(type(p).__module__.split(".")[0] in ("optimum", "bitsandbytes") for p in module.parameters())


def quantize_frozen(module: Any, levels: dict[str, str]) -> None:
    """Quantise the frozen weights after load and before the adapter (models/quantize.py): ``levels``
    maps a component name to its level; nf4 was applied while loading."""
    from models.quantize import quantize_module

    for name, level in levels.items():
        part = getattr(module, name, None)
        if part is not None and level not in ("no_change", "nf4-bnb"):
            quantize_module(part, level)


def setup_adapter(
    denoiser: torch.nn.Module, finetune: str, lora: dict, default_targets, checkpointing: bool, names=("default",),
    dtype=torch.float32,
) -> None:
    """LoRA through peft (only the adapters train, in ``dtype``: ``model.weight_dtype``) or the whole denoiser.
    ``names``: the adapters, one per split-schedule expert when a run trains two."""
    if finetune == "lora":
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        rank = int(lora.get("rank", 16))  # >= 1: tuner.config checks it before load
        config = LoraConfig(
            r=rank,
            lora_alpha=rank if lora.get("alpha") is None else lora["alpha"],
            lora_dropout=float(lora.get("dropout") or 0.0),
            init_lora_weights="gaussian",
            target_modules=list(lora.get("target_modules") or default_targets),
            use_dora=bool(lora.get("use_dora")),  # the magnitude vectors train, checkpoint and export with the LoRA
        )
        for name in names:
            if hasattr(denoiser, "add_adapter"):
                denoiser.add_adapter(config, adapter_name=name)
            else:  # a denoiser without diffusers' PEFT mixin (PixArt's transformer): peft injects the same layers
                from peft import inject_adapter_in_model

                inject_adapter_in_model(config, denoiser, adapter_name=name)
                denoiser.peft_config = {**getattr(denoiser, "peft_config", {}), name: config}
        if len(names) > 1:  # adding an adapter freezes the others; every one trains
            for param_name, p in denoiser.named_parameters():
                if any(f".{name}." in param_name for name in names):
                    p.requires_grad_(True)
        cast_training_params(denoiser, dtype=dtype)  # only what trains is cast (upcast from a half-precision base)
    elif finetune == "full":
        denoiser.requires_grad_(True)
    elif finetune != "lycoris":  # LyCORIS: a network of its own beside the denoiser (lycoris_network)
        raise ValueError(f"model.finetune={finetune!r}; valid: lora, full, lycoris")
    if checkpointing:
        denoiser.enable_gradient_checkpointing()


# The optimisers' settings (AdamW, Lion, Adafactor, Prodigy, the 8-bit ones) a resume takes from the config.
# A group's other entries may be running state (Prodigy's d, d_max, k), restored as saved.
RESUME_SETTINGS = frozenset({"lr", "weight_decay", "betas", "eps", "momentum", "beta3", "d_coef", "growth_rate",
                             "decay_rate", "clip_threshold", "d0", "decouple", "use_bias_correction"})


def apply_config_to_optimizer_state(checkpoint: dict, optimizer_factory, text_encoder_lr: float | None = None) -> None:
    """A resume takes the optimiser's settings from the config, not the checkpoint: a lower
    ``optimizer.lr`` set on resume used to be overwritten by the saved state without a word. Called (from
    ``on_load_checkpoint``) before Lightning restores the optimiser and scheduler from ``checkpoint``, whose
    states it edits: each changed setting is set in every parameter group; a changed lr also becomes the
    schedule's base (it continues from the resumed step, at the new rate). A different optimiser class is
    refused."""
    states = checkpoint.get("optimizer_states") or []
    if not states:
        return
    fresh = optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    saved_class = checkpoint.get("tuner_optimizer")
    if saved_class and saved_class != type(fresh).__name__:
        from callbacks.checkpoints import CheckpointError

        raise CheckpointError(
            f"the checkpoint's optimiser is {saved_class}, this run's {type(fresh).__name__}: its saved state "
            f"cannot carry over; resume with the optimizer it was trained with, or start a new run"
        )
    changed: dict[str, tuple] = {}
    for group in states[0].get("param_groups", []):
        for key, new in fresh.defaults.items():
            if key == "lr":  # a LoRA+ group learns at a multiple of the rate, the text encoders' at their own
                new = group_rate(group, new, text_encoder_lr)
            if key not in RESUME_SETTINGS or key not in group or _same(group[key], new):
                continue
            old = group[key]
            changed[key] = (old, new)
            if key == "lr":  # the current rate keeps its place in the schedule: scaled by new / old base
                base = group.get("initial_lr", old)
                group["lr"] = new * (old / base) if base else new
                group["initial_lr"] = new
            else:
                group[key] = new
    if "lr" in changed:
        bases = [group.get("initial_lr", group["lr"]) for group in states[0].get("param_groups", [])]
        for scheduler in checkpoint.get("lr_schedulers") or []:
            if "base_lrs" in scheduler and len(scheduler["base_lrs"]) == len(bases):
                scheduler["base_lrs"] = bases
    for key, (old, new) in changed.items():
        log.warning("resume: optimizer.%s is %s in this run's config (%s in the checkpoint); %s", key, new, old,
                    "the schedule continues from the resumed step at it" if key == "lr" else "applied")


def _same(a, b) -> bool:
    """Equal settings, tuples and lists alike (betas come back from a checkpoint as lists)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return bool(torch.as_tensor(a).eq(torch.as_tensor(b)).all())
    return a == b


def param_groups(named: list[tuple[str, torch.nn.Parameter]], ratio: float | None, text_encoders=()) -> list:
    """The optimiser's parameters: a plain list, or groups. With LoRA+ (``model.lora.plus_ratio``) the B matrices'
    group is marked ``lr_scale=ratio``; the LoRA of the text encoders named in ``text_encoders`` (by module path)
    goes in groups of its own marked ``text_encoder`` (its rate: ``model.lora.text_encoder_lr``).
    ``group_rate`` gives each group its rate once the optimiser exists."""
    if not ratio and not text_encoders:
        return [p for _, p in named]
    groups = []
    for encoder in (False, True) if text_encoders else (False,):
        part = [(n, p) for n, p in named if n.split(".", 1)[0] in text_encoders] if encoder else [
            (n, p) for n, p in named if n.split(".", 1)[0] not in text_encoders]
        mark = {"text_encoder": True} if encoder else {}
        if not ratio:
            groups.append({"params": [p for _, p in part], **mark})
            continue
        groups.append({"params": [p for n, p in part if ".lora_B." not in n], **mark})
        groups.append({"params": [p for n, p in part if ".lora_B." in n], "lr_scale": float(ratio), **mark})
    return groups


def group_rate(group: dict, lr: float, text_encoder_lr: float | None) -> float:
    """A group's learning rate from the run's ``lr``: the text encoders' own where set, times the LoRA+ scale."""
    base = text_encoder_lr if group.get("text_encoder") and text_encoder_lr else lr
    return base * group.get("lr_scale", 1.0)


def scale_group_rates(optimizer: torch.optim.Optimizer, text_encoder_lr: float | None = None) -> None:
    """Each group's own rate (``group_rate``), set before a schedule takes the rates as its base."""
    for group in optimizer.param_groups:
        group["lr"] = group_rate(group, group["lr"], text_encoder_lr)



_INDEXES: dict[tuple[str, str | None], dict | None] = {}


def model_index(path: str, revision: str | None = None) -> dict | None:
    """The checkpoint's model_index.json for the config checks; None where it cannot be read (a local checkpoint not
    written yet, as the demo's; a Hub id not reachable). A Hub id's answer is kept for the process: offline, each
    lookup retries for ~30 s."""
    from diffusers import DiffusionPipeline

    key = (str(path), revision)
    if key in _INDEXES:
        return _INDEXES[key]
    try:
        index = dict(DiffusionPipeline.load_config(path, revision=revision))
    except OSError:
        index = None
    if not Path(path).exists():
        _INDEXES[key] = index
    return index


BASE_MARKER = "tuner_base.json"  # in a diffusers folder tuner wrote from a single-file base (tuner/interop/base_file.py)


def base_record(path: str) -> dict | None:
    """What a folder written from a single-file base was made from (its ``file``, ``identity``); None for others."""
    import json

    marker = Path(str(path)) / BASE_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def base_identity(path: str) -> str:
    """The base model as a checkpoint records it: a folder written from a single file is that file's hash (its
    marker says so), anything else its path or Hub id."""
    return (base_record(path) or {}).get("identity") or str(path)

