"""Quantised frozen weights (the seed's ``base_model_precision`` / ``text_encoder_precision``).

optimum-quanto levels quantise a loaded module in place (``quantize`` + ``freeze``), after the dtype
cast and before the LoRA adapter is added, so the adapter's own weights stay in full precision and
train on top. ``nf4-bnb`` is bitsandbytes' 4-bit NormalFloat, applied by diffusers while loading.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

QUANTO_LEVELS = ("int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto")
LEVELS = ("no_change", *QUANTO_LEVELS, "nf4-bnb")


def _quanto_weights(level: str):
    from optimum import quanto

    return {
        "int8-quanto": quanto.qint8,
        "int4-quanto": quanto.qint4,
        "int2-quanto": quanto.qint2,
        "fp8-quanto": quanto.qfloat8,
    }[level]


def quantize_module(module: torch.nn.Module, level: str) -> torch.nn.Module:
    """Quantise ``module``'s linear and conv weights in place at ``level`` (a quanto level or no_change)."""
    if level == "no_change":
        return module
    if level not in QUANTO_LEVELS:
        raise ValueError(f"cannot quantise a loaded module at {level!r}; valid here: {', '.join(QUANTO_LEVELS)}")
    from optimum.quanto import freeze, quantize

    quantize(module, weights=_quanto_weights(level))
    freeze(module)  # replace the float weights by their quantised form, for real memory savings
    log.info("%s quantised to %s", type(module).__name__, level)
    return module


def load_time_config(level: str, compute_dtype: torch.dtype):
    """``quantization_config`` for ``from_pretrained`` when the level is applied while loading (nf4-bnb)."""
    if level != "nf4-bnb":
        return None
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def device_problem(level: str, accelerator: str, cuda: bool, mps: bool) -> str | None:
    """Why ``level`` cannot run on this machine, or None. Checked before any weight loads."""
    on_mps = accelerator == "mps" or (accelerator == "auto" and mps and not cuda)
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda)
    if level == "fp8-quanto" and on_mps:
        return "fp8-quanto does not run on Apple GPUs (MPS); use int8-quanto or int4-quanto"
    if level == "nf4-bnb" and not on_gpu:
        return "nf4-bnb (bitsandbytes 4-bit) needs a CUDA GPU; on this device use int4-quanto"
    return None
