"""`python -m tuner.export single-file RUN_OR_PIPELINE_DIR OUT.safetensors [--half] [--merge-lora]`: a
trained SD 1.x/2.x or SDXL model as one checkpoint in the original layout, for AUTOMATIC1111, Forge,
ComfyUI and CivitAI.

RUN_OR_PIPELINE_DIR is a ``model.finetune=full`` run's output folder (its ``pipeline/``), a pipeline
folder itself, or, with ``--merge-lora``, a LoRA run's output folder: its LoRA is fused into the base
model the run trained on (``model.pretrained_model_name_or_path`` in its ``.hydra/config.yaml``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tuner.interop.single_file import ExportError, check_supported

LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class Source:
    """What to load: a pipeline (folder or Hub id) of a diffusers class, and the LoRA run to fuse in."""

    pipeline: str
    class_name: str
    lora_run: Path | None = None
    revision: str | None = None
    variant: str | None = None


def find_source(path: Path, merge_lora: bool) -> Source:
    """The pipeline behind ``path``, its class checked before any weight loads."""
    for folder in (path, path / "pipeline"):
        if (folder / "model_index.json").is_file():
            if merge_lora:
                raise ExportError(f"--merge-lora takes a LoRA run's output folder; {folder} is a whole pipeline")
            class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "?")
            check_supported(class_name, str(folder))
            return Source(str(folder), class_name)
    if (path / LORA_FILE).is_file():
        if not merge_lora:
            raise ExportError(
                f"{path} is a LoRA run: add --merge-lora to fuse its {LORA_FILE} into the base model it trained "
                "on and export that (a LoRA file itself loads in A1111 and ComfyUI as it is)"
            )
        return lora_source(path)
    raise ExportError(
        f"{path} holds no pipeline (model_index.json), no full fine-tune's pipeline/ and no LoRA run's {LORA_FILE}"
    )


def lora_source(run: Path) -> Source:
    """The base model a LoRA run trained on, from the config the run recorded."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from tuner.config.families import run_class

    recorded = run / ".hydra" / "config.yaml"
    if not recorded.is_file():
        raise ExportError(f"{run} has no .hydra/config.yaml to name the base model its LoRA was trained on")
    try:
        model = OmegaConf.load(recorded).model
        from tuner.interop.base_file import resolve

        family, base = model.family, resolve(model)  # a single-file base: the diffusers folder written from it
        revision, variant = model.get("revision"), model.get("variant")
    except OmegaConfBaseException as err:
        raise ExportError(f"{recorded}: {err}".splitlines()[0]) from None
    try:
        class_name = run_class(model).pipeline_class.__name__
    except ValueError as err:
        raise ExportError(f"{recorded}: {err}") from None
    check_supported(class_name, f"{run} (model={family})")
    return Source(str(base), class_name, lora_run=run, revision=revision, variant=variant)


def load_pipeline(source: Source, dtype=None):
    """The source's pipeline, with its LoRA (if any) fused into the weights and then unloaded."""
    import inspect

    import diffusers

    cls = getattr(diffusers, source.class_name)
    unused: dict = {}
    if "safety_checker" in inspect.signature(cls.__init__).parameters:  # not part of the checkpoint
        unused = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if dtype is not None:
        unused["torch_dtype"] = dtype
    try:
        pipe = cls.from_pretrained(source.pipeline, revision=source.revision, variant=source.variant, **unused)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot load {source.pipeline}: {err}".splitlines()[0]) from None
    if source.lora_run is not None:
        pipe.load_lora_weights(source.lora_run, weight_name=LORA_FILE)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        pipe.scheduler = trained_scheduler(source.lora_run, pipe.scheduler)
    return pipe


def trained_scheduler(run: Path, base_scheduler):
    """The scheduler a LoRA run validated with (its recorded model settings, e.g. v-prediction or zero
    terminal SNR, on its base model's scheduler): what the merged single file is marked by."""
    from omegaconf import OmegaConf

    from models.noise import build
    from tuner.config.families import family_class

    model = OmegaConf.load(run / ".hydra" / "config.yaml").model
    return build(family_class(model.family).noise_schedule, dict(base_scheduler.config), model).sampling_scheduler()


def single_file(path: Path, out: Path, half: bool = False, merge_lora: bool = False) -> Path:
    """Export ``path`` (see the module docstring) to ``out``; fp16 with ``half``."""
    import torch

    from tuner.interop.single_file import to_ldm

    if out.suffix != ".safetensors":
        raise ExportError(f"{out}: the output file must end in .safetensors")
    if not path.is_dir():
        raise ExportError(f"{path}: no such folder")
    source = find_source(path, merge_lora)
    # fp16 straight from disk saves memory; a LoRA is fused at full precision and rounded afterwards.
    load_dtype = torch.float16 if half and source.lora_run is None else None
    pipe = load_pipeline(source, load_dtype)
    return save(to_ldm(pipe, torch.float16 if half else None), out)


def save(state: dict, out: Path) -> Path:
    """Written beside ``out`` and renamed into place, so an interrupted export leaves no partial file."""
    from safetensors.torch import save_file

    from models.export import respect_umask

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return respect_umask(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tuner.export", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("single-file", help="one original-layout .safetensors (A1111, Forge, ComfyUI, CivitAI)")
    one.add_argument("source", type=Path, help="a full fine-tune's output folder, a pipeline folder, or a LoRA run")
    one.add_argument("out", type=Path, help="the .safetensors file to write")
    one.add_argument("--half", action="store_true", help="write fp16 weights (half the size)")
    one.add_argument("--merge-lora", action="store_true", help="fuse a LoRA run's weights into its base model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = single_file(args.source, args.out, half=args.half, merge_lora=args.merge_lora)
    except ExportError as err:
        print(f"tuner: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
