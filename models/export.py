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
    if hp.finetune == "lora":
        paths = []
        for adapter, tag in module.lora_adapters():  # one file per split-schedule expert in a two-expert run
            name = f"pytorch_lora_weights{tag}{suffix}.safetensors"
            module.pipeline_class.save_lora_weights(
                directory, **module.lora_layers(adapter), weight_name=name, safe_serialization=True
            )
            paths.append(respect_umask(directory / name))
        return paths[0]
    if full_pipeline:
        # The frozen parts are written from the base checkpoint at its own precision, not from the
        # copies loaded for training; only the trained denoiser comes from memory.
        pipe = module.pipeline_class.from_pretrained(
            hp.pretrained_model_name_or_path,
            **{module.denoiser_name: module.denoiser},
            scheduler=module.noise.sampling_scheduler(),
            revision=hp.revision,
            variant=hp.variant,
            **module.pipeline_load_overrides(),
        )
        pipe.save_pretrained(directory / f"pipeline{suffix}", safe_serialization=True)
        return respect_umask(directory / f"pipeline{suffix}")
    module.denoiser.save_pretrained(directory / f"{module.denoiser_name}{suffix}", safe_serialization=True)
    return respect_umask(directory / f"{module.denoiser_name}{suffix}")


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
