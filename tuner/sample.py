"""`python -m tuner.sample RUN_OR_PIPELINE "prompt" [options]`: images (or clips) from a finished run or a
pipeline folder, sampled the way the run's validation samples.

RUN_OR_PIPELINE is a run's output folder (it has ``.hydra/config.yaml``): a LoRA run is its base model
(``model.pretrained_model_name_or_path``) with the run's LoRA loaded as the family's model card says, a full
fine-tune is its ``pipeline/``; the scheduler is the one the run validated with, and steps, guidance, size,
negative prompt and seed default to its ``callbacks.validation`` settings. Or it is any diffusers pipeline
folder (``model_index.json``), whose family is told by its pipeline class and sampled with that family's
defaults. Writes ``DIR/<seed>_<prompt>.png`` (a video family: ``.mp4`` and a frame strip) and prints the paths.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LORA_FILE = "pytorch_lora_weights.safetensors"
EXPERTS = ("high_noise", "low_noise")


class SampleError(Exception):
    """A user error: printed as one line, exit status 2."""


@dataclass
class Source:
    """What to sample: the family's class, where its pipeline loads from, and what the run adds to it."""

    cls: type
    pipeline: str
    run: Path | None = None  # a run's output folder (its LoRA, when ``lora``)
    lora: bool = False
    experts: bool = False
    model: Any = None  # the run's ``cfg.model``
    defaults: dict = field(default_factory=dict)  # steps, guidance, size, negative, seed, fps


# ---- what the path is ---------------------------------------------------------------------------------------
def family_of_pipeline(class_name: str) -> type:
    """The family (its class) whose pipeline, or control pipeline, is ``class_name``; the first in
    ``families()`` order when several share one (sd15 and sd2 both use StableDiffusionPipeline)."""
    from models.base import pipeline_name, resolve
    from tuner.config.families import families, family_class

    for family in families():
        cls = family_class(family)
        candidates = [cls] + ([resolve(cls.control_class)] if cls.control_class else [])
        for candidate in candidates:
            if pipeline_name(candidate) == class_name:
                return candidate
    # a variant's own pipeline (QwenImageEditPlusPipeline): the family with the longest common stem
    stems = {pipeline_name(family_class(f)).removesuffix("Pipeline"): f for f in families()}
    matching = sorted((stem for stem in stems if class_name.startswith(stem)), key=len)
    if matching:
        return family_class(stems[matching[-1]])
    raise SampleError(f"{class_name}: no tuner family samples this pipeline class")


def pipeline_source(folder: Path) -> Source:
    """A pipeline folder, sampled with its family's defaults."""
    try:
        class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "?")
    except (OSError, ValueError) as err:
        raise SampleError(f"{folder / 'model_index.json'}: {err}".splitlines()[0]) from None
    return Source(family_of_pipeline(class_name), str(folder), defaults=dict(FAMILY_DEFAULTS))


FAMILY_DEFAULTS = {"steps": 25, "guidance": 7.5, "size": (1024, 1024), "negative": "", "seed": 42, "fps": 16.0}


def run_defaults(cfg) -> dict:
    """Validation's settings of the run, as tuner.runtime.lifecycle's ``validation_callback`` reads them."""
    val = cfg.callbacks.validation
    side = int(val.resolution or (cfg.data.resolution if cfg.data.resolution >= 16 else 1024))
    return {
        "steps": int(val.num_inference_steps),
        "guidance": float(val.guidance_scale),
        "size": (side, side),
        "negative": val.negative_prompt or "",
        "seed": int(val.seed),
        "fps": float(val.fps or cfg.data.get("frame_rate") or 16.0),
    }


def run_source(run: Path, ema: bool) -> Source:
    """A run's output folder: its ``pipeline/`` (a full fine-tune) or its base with its LoRA."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from tuner.config.families import run_class

    recorded = run / ".hydra" / "config.yaml"
    try:
        cfg = OmegaConf.load(recorded)
        model, finetune, defaults = cfg.model, str(cfg.model.finetune), run_defaults(cfg)
        cls = run_class(model)
        from tuner.interop.base_file import resolve

        base = resolve(model)  # a single-file base: the diffusers folder written from it
    except (OmegaConfBaseException, ValueError) as err:
        raise SampleError(f"{recorded}: {err}".splitlines()[0]) from None
    if finetune == "full":
        if not (run / "pipeline" / "model_index.json").is_file():
            raise SampleError(f"{run} is a full fine-tune without its pipeline/ (has the run finished?)")
        return Source(cls, str(run / "pipeline"), run, model=model, defaults=defaults)
    if finetune != "lora":
        raise SampleError(f"{run}: model.finetune={finetune} runs are not sampled here; load the LoRA as its README says")
    experts = bool(model.get("experts"))
    names = [f"pytorch_lora_weights_{name}" for name in EXPERTS] if experts else ["pytorch_lora_weights"]
    suffix = "_ema" if ema else ""
    missing = [f"{name}{suffix}.safetensors" for name in names if not (run / f"{name}{suffix}.safetensors").is_file()]
    if missing:
        hint = " (was callbacks.ema.enabled set?)" if ema else " (has the run finished?)"
        raise SampleError(f"{run} has no {', '.join(missing)}{hint}")
    return Source(cls, base, run, lora=True, experts=experts, model=model, defaults=defaults)


def find_source(path: Path, ema: bool) -> Source:
    """What ``path`` is: a run's output folder or a pipeline folder."""
    if not path.exists():
        raise SampleError(f"{path}: no such folder")
    if (path / ".hydra" / "config.yaml").is_file():
        return run_source(path, ema)
    if ema:
        raise SampleError(f"--ema: {path} is a pipeline folder, not a run with an EMA LoRA")
    if (path / "model_index.json").is_file():
        return pipeline_source(path)
    raise SampleError(f"{path} is neither a run's output folder (.hydra/config.yaml) nor a pipeline (model_index.json)")


# ---- loading ------------------------------------------------------------------------------------------------
def load_pipeline(source: Source, dtype, device: str, ema: bool):
    """The pipeline, its LoRA (if any) loaded, the run's sampling scheduler set, on ``device``."""
    import inspect

    from diffusers import DiffusionPipeline

    loader = source.cls.pipeline_class if _is_control(source.cls) else DiffusionPipeline  # a control run's own
    extra: dict[str, Any] = {"torch_dtype": dtype}
    model = source.model
    if model is not None and source.lora:
        extra.update(revision=model.get("revision"), variant=model.get("variant"))
    try:
        class_name = DiffusionPipeline.load_config(source.pipeline, revision=extra.get("revision")).get("_class_name")
        import diffusers

        pipeline_cls = getattr(diffusers, str(class_name), None) or DiffusionPipeline
        if "safety_checker" in inspect.signature(pipeline_cls.__init__).parameters:
            extra.update(safety_checker=None, requires_safety_checker=False)
        pipe = loader.from_pretrained(source.pipeline, **extra)
    except (OSError, ValueError) as err:
        raise SampleError(f"cannot load {source.pipeline}: {err}".splitlines()[0]) from None
    if source.lora:
        with _weights_folder(source.run, ema) as folder:
            load_experts(source, pipe, folder) if source.experts else source.cls.load_lora(pipe, folder)
        pipe.scheduler = run_scheduler(source, pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _is_control(cls: type) -> bool:
    """Whether ``cls`` is a family's control class (its pipeline differs from the base model's own)."""
    from tuner.config.families import families, family_class

    return cls not in {family_class(f) for f in families()}


class _weights_folder:  # noqa: N801 - a context manager used like a function
    """The run's folder, or with ``ema`` a temporary one where its ``*_ema`` weights carry the plain names
    (a family's loader reads only those)."""

    def __init__(self, run: Path, ema: bool):
        self.run, self.ema, self.tmp = run, ema, None

    def __enter__(self) -> Path:
        if not self.ema:
            return self.run
        self.tmp = tempfile.TemporaryDirectory(prefix="tuner-sample-")
        for path in self.run.iterdir():
            if "_ema" in path.name:
                (Path(self.tmp.name) / path.name.replace("_ema", "")).symlink_to(path.resolve())
        return Path(self.tmp.name)

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def load_experts(source: Source, pipe, folder: Path) -> None:
    """A two-expert run's LoRAs, one adapter each, switched by the timestep the pipeline hands its denoiser (the
    model card's snippet)."""
    import torch

    for name in EXPERTS:
        pipe.load_lora_weights(folder, weight_name=f"pytorch_lora_weights_{name}.safetensors", adapter_name=name)
    boundary = float(source.model.expert_boundary)
    boundary *= source.cls.denoiser_timestep_scale or pipe.scheduler.config.num_train_timesteps

    def pick_expert(module, args, kwargs):
        t = torch.as_tensor(kwargs.get("timestep", args[1] if len(args) > 1 else None))
        pipe.set_adapters("low_noise" if float(t.flatten()[0]) < boundary else "high_noise")

    getattr(pipe, source.cls.denoiser_name).register_forward_pre_hook(pick_expert, with_kwargs=True)


def run_scheduler(source: Source, base_scheduler):
    """The sampling scheduler the run validated with: its model settings on its base model's scheduler."""
    from models.noise import build

    return build(source.cls.noise_schedule, dict(base_scheduler.config), source.model).sampling_scheduler()


# ---- sampling -----------------------------------------------------------------------------------------------
def options_of(source: Source):
    """The family's options: the run's ``model.options``, or the family's defaults for a pipeline folder."""
    from omegaconf import OmegaConf

    given = OmegaConf.to_container(source.model.options, resolve=True) if source.model is not None else {}
    try:
        return source.cls.Options(**(given or {}))
    except TypeError as err:
        raise SampleError(f"model.options: {err}") from None


def sampler(source: Source, pipe, device: str, image=None):
    """The family's module as validation uses it, around ``pipe``'s own modules: its ``sample_image`` (the
    family's pipeline inputs, latents and decode) with no training weights loaded again."""
    import torch

    cls, chosen = source.cls, options_of(source)
    module = cls.__new__(cls)  # no __init__: it would load the checkpoint a second time
    module.__dict__.update({name: part for name, part in pipe.components.items() if part is not None})
    module.__dict__.update(
        options=chosen,
        vae_dtype=pipe.vae.dtype if getattr(pipe, "vae", None) is not None else torch.float32,
        denoiser_dtype=pipe.dtype,
        _device=torch.device(device),
        plus=type(pipe).__name__.endswith("PlusPipeline"),
        pipeline_class=type(pipe),
    )
    if image is not None and "upscale_factor" in vars(type(chosen)).get("__dataclass_fields__", {}):
        pixels = torch.from_numpy(__import__("numpy").asarray(image, dtype="float32")).permute(2, 0, 1)
        module.__dict__.update(_held_out=[pixels / 127.5 - 1], _prompt_slots={})  # IF stage II upscales it
    return module


def needs_image(source: Source, chosen_options) -> str | None:
    """Why the family samples only from an input image (``--image``), or None."""
    from models.base import pipeline_name

    name = pipeline_name(source.cls)
    if source.cls.conditioning_kinds:
        return f"{name} samples from an input image ({', '.join(source.cls.conditioning_kinds)})"
    if hasattr(chosen_options, "upscale_factor") and not getattr(chosen_options, "stage_1", None):
        return f"{name} upscales an input image (model.options.stage_1 is not set)"
    return None


def sample(module, pipe, prompt: str, settings: dict, out_dir: Path, image=None) -> list[Path]:
    """``settings['count']`` samples of ``prompt``, seeds from ``settings['seed']``: the written paths."""
    import torch

    from callbacks.validation import shortname
    from callbacks.video_out import frame_strip, write_clip

    width, height = settings["size"]
    upscaler = "_held_out" in module.__dict__
    given = {"image": image} if image is not None and not upscaler else {}
    slug = shortname(prompt, set())
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for seed in range(settings["seed"], settings["seed"] + settings["count"]):
        if upscaler:
            module._prompt_slots = {}
        result = module.sample_image(
            pipe,
            prompt,
            **given,
            negative_prompt=settings["negative"] or None,
            num_inference_steps=settings["steps"],
            guidance_scale=settings["guidance"],
            width=width,
            height=height,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        stem = out_dir / f"{seed}_{slug}"
        if isinstance(result, list):  # a video family's clip: the .mp4, and its frame strip
            written.append(write_clip(result, stem, settings["fps"]))
            result = frame_strip(result)
        result.save(stem.with_suffix(".png"))
        written.append(stem.with_suffix(".png"))
    return written


# ---- the command line ---------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """``"768x512"`` (width x height) or ``"512"``."""
    try:
        width, _, height = text.lower().partition("x")
        size = (int(width), int(height or width))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give WIDTHxHEIGHT, e.g. 768x512") from None
    if min(size) < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: too small")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tuner.sample", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a run's output folder, or a diffusers pipeline folder")
    parser.add_argument("prompt", help="what to sample")
    parser.add_argument("--negative", default=None, help="negative prompt (default: the run's validation one)")
    parser.add_argument("--steps", type=int, default=None, help="inference steps (default: the run's validation)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's validation)")
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: the run's validation seed)")
    parser.add_argument("--count", type=int, default=1, help="samples, seeds SEED..SEED+COUNT-1")
    parser.add_argument("--size", type=parse_size, default=None, help="WIDTHxHEIGHT (default: the run's validation)")
    parser.add_argument("--image", type=Path, default=None, help="the input image of an edit, control or upscale model")
    parser.add_argument("--ema", action="store_true", help="a LoRA run's EMA weights (pytorch_lora_weights_ema)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="folder (default: RUN/samples or ./samples)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    return parser


def settings_of(args: argparse.Namespace, source: Source) -> dict:
    """The sampling settings: the flags given, the run's (or family's) validation defaults for the rest."""
    if args.count < 1:
        raise SampleError(f"--count={args.count}: give 1 or more")
    if args.steps is not None and args.steps < 1:
        raise SampleError(f"--steps={args.steps}: give 1 or more")
    given = {"steps": args.steps, "guidance": args.guidance, "size": args.size, "negative": args.negative, "seed": args.seed}
    settings = {**source.defaults, **{key: value for key, value in given.items() if value is not None}}
    return {**settings, "count": args.count}


def read_image(path: Path | None):
    if path is None:
        return None
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as err:
        raise SampleError(f"--image: cannot read {path} ({err})".splitlines()[0]) from None


def run(args: argparse.Namespace) -> list[Path]:
    """Everything the command does; raises SampleError for a user error."""
    import torch

    source = find_source(args.source, args.ema)
    settings = settings_of(args, source)
    image = read_image(args.image)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    reason = needs_image(source, options_of(source))
    if reason and image is None:
        raise SampleError(f"--image: {reason}; pass --image PATH")
    pipe = load_pipeline(source, dtype, device, args.ema)
    module = sampler(source, pipe, device, image)
    out_dir = args.output or (source.run / "samples" if source.run is not None else Path("samples"))
    with torch.no_grad():
        return sample(module, pipe, args.prompt, settings, out_dir, image)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = run(args)
    except SampleError as err:
        print(f"tuner: error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
