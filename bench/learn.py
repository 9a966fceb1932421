"""Does a family learn? ``python bench/learn.py [--family F ...] [--finetune lora full]``

For each family of conf/model/ (or those named):

1. a learnable tiny pipeline (``python -m tuner.tiny FAMILY DIR --learnable``: a nearly deterministic VAE
   set by construction, with unit-variance latents; text encoders that tell prompts apart; the denoiser
   random, a transformer widened and given distinct position codes);
2. a toy set in which only the caption tells the classes apart: the same faint square, in one of four
   quadrants of a grey-blue image, captioned with its quadrant. Every class has the same mean colour, and
   the square is faint enough that over the upper half of the noise schedule the noisy image does not give
   its quadrant away: there the denoiser must read the text;
3. training through ``train.py``, LoRA and full fine-tune;
4. sampling every class prompt through the family's own diffusers pipeline (the exported LoRA loaded the
   way the model card says, or the exported ``pipeline/``), several seeds each;
5. nearest-class accuracy of the samples against the classes' clean images (chance: 0.25).

Prints ``learn_acc_<family>_<finetune>=…`` and ``learn_acc_<family>=…`` (the lower of its runs) as they come,
and last every family's figure and ``learn_acc_min=…`` on one line. A family passes at >= 0.9. Split-schedule
experts: ``--finetune experts`` is a two-LoRA run (``model.experts=two_lora``) on the LoRA's base, sampled with
both adapters as the model card says (``learn_acc_<family>_experts``).

IF stage II upscales: it is given the class's own low-res image (what it conditions on), so its score says
that the upscaler reproduces the image it is given rather than noise; the caption alone decides nothing
there.

**The edit task**, for a family that edits an input image (its class declares ``"reference"`` in
``conditioning_kinds``: FLUX.1 Kontext), in place of the caption task: only the *input* image decides the class.
Each training pair is a target and its reference (``data.conditioning.reference.path``, the same file names); every
caption is one constant instruction (``EDIT_CAPTION``); the reference shows the faint square in one quadrant and the
target the same square moved to the other side (left <-> right: ``EDIT_SOURCE``), jittered alike. A model that
copies its input scores 0; one that ignores it, chance. Sampling passes the class's clean reference as ``image=``
with the instruction, and scores the samples against the four target images as above. The LoRA's base learns to
copy: its generic shapes are paired with themselves.

**The motion task** (bench/toysets.py), which a video family learns: 9-frame clips of a faint square crossing the
image (its path centred), captioned with the direction it moves ("left moving square"), trained at
``data.num_frames=9`` and scored by the nearest class clip over every frame. Only the caption tells the directions
apart, and only with the frames in order: the first latent frame holds the start, the later ones the rest of the
path. The LoRA's base is trained on generic clips (``Recipe.clip_base``: shapes drifting at random, captioned with
their colour only), as a real video model has seen things move. ``--recipe task=caption`` learns the caption task
instead, on images as 1-frame clips sampled as one frame, with the family's ``CAPTION_RECIPES`` (the suite's check).

``--smoke``: SD 1.5's LoRA on a base, 2 steps each, 1 seed, 2 sampling steps, in a temporary folder: the code
path in seconds; its accuracy means nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import ROOT
from toysets import (
    CLASSES,
    EDIT_CAPTION,
    EDIT_SOURCE,
    MOTION_FRAMES,
    SIZE,
    caption,
    class_image,
    contrast_for,
    low_res,
    motion_caption,
    motion_templates,
    nearest_class,
    templates,
    write_edit_set,
    write_generic_clips,
    write_generic_set,
    write_motion_set,
    write_toy_set,
)


@dataclass(frozen=True)
class Recipe:
    """How a family trains on the toy set."""

    steps: int = 1000  # a full fine-tune's
    lora_steps: int = 2000  # a LoRA's (and a two-expert run's): on a base, at a lower rate
    lr_full: float = 5e-3
    lr_lora: float = 2e-3  # 5e-3 for 1000 steps: PixArt 0.875, SD 1.5 0.78; 1.5e-2 diverged (PixArt 0.25)
    rank: int = 16
    batch_size: int = 8
    guidance_scale: float = 4.0
    sampling_steps: int = 20
    base_steps: int = 1000  # the LoRA's base: full training on generic shapes (``pretrain``)
    size: int = SIZE  # the toy images' side in pixels
    lora_targets: str | None = None  # model.lora.target_modules for a LoRA; None: UNET_LORA_TARGETS or the family's
    true_cfg: bool = False  # sample a guidance-embedding model with real CFG, its embedding at the trained 1.0 (Flux)
    task: str = ""  # caption, edit or motion ("": edit for a family that edits its input, motion for video, else caption)
    contrast: int = 0  # levels the square is above the background (0: toysets.CONTRAST for the family's kind)
    tiny: str = ""  # one of the family's tiny variants to learn on (--recipe tiny=flux2-dev); "": the family's own
    clip_base: bool = False  # the motion task: the LoRA's base trains on generic clips (write_generic_clips), not images
    text_tokens: int = 0  # the prompt's length in tokens, trained and sampled (model.options.max_sequence_length); 0: the family's


# DDPM families train with v-prediction here. An epsilon denoiser trained from random weights for a thousand
# steps gets the image's mean colour wrong: at high noise its loss weighs x0 by the SNR (0.005 at SD's last
# timestep), so the mean is barely taught where sampling decides it (SD 1.5, full: 0.44, samples in
# whole-image colours no class had; v-prediction: 1.00). Real epsilon checkpoints were trained for hundreds
# of thousands of steps; v-prediction goes through the same conditioning, export and scheduler-change paths.
DDPM_OVERRIDES = ("model.prediction_type=v_prediction",)
# A UNet's LoRA also trains its ResNet convolutions (kohya's LoCon), not only attention. The tiny UNets have
# cross-attention at one resolution and in the mid block, and a LoRA there alone gave SD 1.5 0.84; with the
# convolutions, 1.00.
UNET_LORA_TARGETS = "model.lora.target_modules=[to_k,to_q,to_v,to_out.0,conv1,conv2]"

# Pixel families denoise 64x64x3 pixels, ~4x the cost of a step in 8x8 latents; 500 steps are enough there
_PIXEL = Recipe(steps=500, base_steps=500, lora_steps=1000)
# IF stage I at 32x32 (a quarter of its own 64x64), its square twice as bright so the classes differ as much:
# a quarter of the cost a step. 500 steps gave 1.00 with one thread, 0.75 with two (it mixed up left and right
# in one class); 800 steps with two threads, 0.94. At 64x64, 500 steps had given 1.00, 0.88 (cosine) and 0.50.
# Kolors at 5e-3 learned the classes, then diverged in its last hundred steps (gradient spikes past the clip,
# samples of noise: 0.28; a cosine decay from 5e-3: 0.81); at 2e-3, 1.00
RECIPES: dict[str, Recipe] = {  # where the default does not fit
    "deepfloyd_if": dataclasses.replace(_PIXEL, size=32, steps=800),
    "deepfloyd_if_sr": _PIXEL,
    "kolors": Recipe(lr_full=2e-3),
    # FLUX.1 [dev] is guidance-distilled: it samples without CFG, guidance_scale going into an embedding. The tiny
    # base here is not distilled: it trained with that embedding at 1.0 only, and at 4.0 (never seen) its LoRA
    # scored 0.34-0.41. Sampled as a non-distilled Flux is (SimpleTuner's real-CFG validation): the embedding at
    # 1.0 and FluxPipeline's true_cfg_scale=4 with an empty negative prompt, the same LoRA scored 1.00 (all
    # linear layers) and 0.88 (attention only); the full fine-tune 1.00 either way.
    "flux": Recipe(true_cfg=True, lora_targets="[all]"),
    # Qwen-Image's CFG is true_cfg_scale with a negative prompt (its guidance_scale is for distilled checkpoints)
    "qwen_image": Recipe(true_cfg=True),
    # FLUX.1 Kontext learns the edit task, whose caption is constant: no CFG to sample with (the class is in the input
    # image), so it samples as Kontext [dev] is sampled, its guidance embedding at the trained 1.0; a LoRA on every
    # linear layer, as Flux.1's
    "flux_kontext": Recipe(guidance_scale=1.0, lora_targets="[all]"),
    # The video families learn the motion task (module docstring): 24 text rows (the toy prompt's ~6 real tokens;
    # at the pipeline's 512, ~500 identical padding rows beside them, Wan's full fine-tune scored 0.562), lr 1e-3
    # (at 5e-3 Wan's transformer learned to ignore its prompt: 0.25), 6000 steps (3000: Wan 0.875, LTX 0.844). The
    # LoRA's base is trained in full on generic clips (shapes drifting at random, captioned with colour only), and the
    # LoRA, rank 32, learns the directions in 12000 steps (8000 at rank 16: 0.25-0.50). bench/README.md has the runs.
    "wan": Recipe(task="motion", steps=6000, lr_full=1e-3, text_tokens=24, clip_base=True, base_steps=6000,
                  lora_steps=12000, rank=32, lora_targets="[all]"),
    "ltx_video": Recipe(task="motion", steps=6000, lr_full=1e-3, text_tokens=24, clip_base=True, base_steps=6000,
                        lora_steps=12000, rank=32),
}


# The video families' caption-task recipes (images as 1-frame clips, sampled as one frame: ``--recipe task=caption``
# with these), which the suite's learning test runs as the cheaper check (tests/test_learning.py). Wan at 512 text
# rows needs 3000 steps (1000 with 24 rows); its LoRA on every linear layer (attention only: 0.875).
CAPTION_RECIPES: dict[str, Recipe] = {
    "wan": Recipe(steps=3000, base_steps=3000, lora_steps=4000, task="caption", lora_targets="[all]"),
    "ltx_video": Recipe(task="caption"),
}


def task_of(family: str, recipe: Recipe) -> str:
    """The toy task ``family`` learns: the recipe's, or ``edit`` for a family that edits an input image (it consumes
    references), ``motion`` for one that trains on clips, else ``caption``."""
    from tuner.config.families import family_class

    cls = family_class(family)
    if recipe.task:
        return recipe.task
    if "reference" in getattr(cls, "conditioning_kinds", ()):
        return "edit"
    return "motion" if getattr(cls, "video", False) else "caption"



def lora_targets(family: str, recipe: Recipe) -> str | None:
    """The ``model.lora.target_modules`` override of the recipe's LoRA runs, or None for the family's default."""
    from tuner.config.families import family_class

    if recipe.lora_targets:
        return f"model.lora.target_modules={recipe.lora_targets}"
    return UNET_LORA_TARGETS if family_class(family).denoiser_name == "unet" else None


def train(family: str, pipe_dir: Path, data: Path, out: Path, finetune: str, recipe: Recipe, extra=(),
          steps: int | None = None) -> float:
    """One run through train.py; returns its wall time in seconds."""
    from tuner.config.families import family_class

    lr = recipe.lr_full if finetune == "full" else recipe.lr_lora
    args = [
        f"model={family}",
        f"model.pretrained_model_name_or_path={pipe_dir}",
        "model.finetune=lora" if finetune == "experts" else f"model.finetune={finetune}",
        *(["model.experts=two_lora"] if finetune == "experts" else []),
        f"model.lora.rank={recipe.rank}",
        f"data.path={data}",
        f"data.resolution={recipe.size}",
        f"data.bucket_step={bucket_step(family, pipe_dir)}",
        f"data.batch_size={recipe.batch_size}",
        "data.caption_dropout_probability=0.1",  # the unconditional prompt classifier-free guidance needs
        f"max_train_steps={steps or (recipe.steps if finetune == 'full' else recipe.lora_steps)}",
        "checkpointing_steps=0",
        f"optimizer.lr={lr}",
        "callbacks.validation.enabled=false",
        "callbacks.ema.enabled=false",
        "trainer.enable_progress_bar=false",
        "seed=0",
        f"output_dir={out}",
        *(DDPM_OVERRIDES if family_class(family).noise_schedule == "ddpm" else ()),
        *([f"model.options.max_sequence_length={recipe.text_tokens}"] if recipe.text_tokens else []),
        *([lora_targets(family, recipe)] if finetune != "full" and lora_targets(family, recipe) else []),
        *extra,
    ]
    env = {**os.environ, "TUNER_LOG_LEVEL": "WARNING"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{family} {finetune}: train.py failed\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start



def bucket_step(family: str, pipe_dir: Path) -> int:
    """The tiny preset's 16, or the checkpoint's edge multiple where larger (LTX's VAE 32; Wan 2.2 TI2V's 16x VAE 32)."""
    from omegaconf import OmegaConf

    from tuner.config.families import family_class

    model_cfg = OmegaConf.create({"pretrained_model_name_or_path": str(pipe_dir), "revision": None})
    return max(16, family_class(family).pixel_multiple_for(model_cfg))


def pretrain(family: str, pipe_dir: Path, work: Path, recipe: Recipe, extra=()) -> tuple[Path, float]:
    """The LoRA's base: the learnable pipeline trained in full on generic shapes, so that it denoises, as a
    real base model does before anyone trains a LoRA on it (a LoRA on a random denoiser learned nothing in
    1000 steps: SD3 0.25). Written once per work folder; returns its ``pipeline/`` and the time it took."""
    clips = task_of(family, recipe) == "motion" and recipe.clip_base
    out = work / "runs" / f"{family}-base{'-clips' if clips else ''}"
    if (out / "pipeline" / "model_index.json").is_file():
        return out / "pipeline", 0.0
    if clips:  # a video model's base has seen clips move
        data = write_generic_clips(work / f"generic-clips-{recipe.size}", recipe.size)
        extra = (*extra, f"data.num_frames={MOTION_FRAMES}")
    else:
        data = write_generic_set(work / f"generic-{recipe.size}", recipe.size)
    if task_of(family, recipe) == "edit":  # an edit model's base learns to copy its input: each image is its own reference
        extra = (*extra, f"data.conditioning.reference.path={data}")
    seconds = train_full(family, pipe_dir, data, out, recipe, extra, steps=recipe.base_steps)
    return out / "pipeline", seconds


def two_transformers(pipe_dir: Path) -> bool:
    """Whether the pipeline holds two expert transformers (Wan 2.2 A14B: ``transformer`` and ``transformer_2``)."""
    index = json.loads((Path(pipe_dir) / "model_index.json").read_text())
    return (index.get("transformer_2") or [None])[0] is not None


def train_full(family: str, pipe_dir: Path, data: Path, out: Path, recipe: Recipe, extra=(), steps: int | None = None):
    """A full fine-tune; of both experts where the pipeline has two transformers, one run each (a run trains one:
    ``model.expert``), the low-noise expert's on the high-noise run's pipeline. Returns the seconds it took."""
    if not two_transformers(pipe_dir):
        return train(family, pipe_dir, data, out, "full", recipe, extra, steps)
    high = out.parent / f"{out.name}-high-noise"
    seconds = train(family, pipe_dir, data, high, "full", recipe, (*extra, "model.expert=high_noise"), steps)
    return seconds + train(family, high / "pipeline", data, out, "full", recipe, (*extra, "model.expert=low_noise"), steps)


def load_trained(family: str, pipe_dir: Path, out: Path, finetune: str):
    """The family's own pipeline with what the run exported, loaded as its model card says."""
    from diffusers import DiffusionPipeline

    from tuner.config.families import family_class

    cls = family_class(family)
    if finetune == "full":
        return DiffusionPipeline.from_pretrained(out / "pipeline")
    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    if finetune == "experts" and getattr(pipe, "transformer_2", None) is not None:  # Wan 2.2 A14B: as its card says
        pipe.load_lora_weights(out, weight_name="pytorch_lora_weights_high_noise.safetensors")
        pipe.load_lora_weights(out, weight_name="pytorch_lora_weights_low_noise.safetensors", load_into_transformer_2=True)
    elif finetune == "experts":
        load_experts(cls, pipe, out)
    else:
        cls.load_lora(pipe, out)
    change = card_scheduler(out)
    if change:  # the scheduler line of the card (IF's fixed variance, v-prediction, ...)
        import diffusers

        scheduler_cls = getattr(diffusers, change["class_name"])
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **change["changes"])
    return pipe


def load_experts(cls, pipe, out: Path) -> None:
    """A two-expert run's LoRAs, one adapter each, switched by the timestep the pipeline passes its denoiser:
    the model card's snippet (callbacks/model_card.py ``_experts``)."""
    import torch
    from omegaconf import OmegaConf

    for name in ("high_noise", "low_noise"):
        pipe.load_lora_weights(out, weight_name=f"pytorch_lora_weights_{name}.safetensors", adapter_name=name)
    boundary = float(OmegaConf.load(out / ".hydra" / "config.yaml").model.expert_boundary)
    boundary *= cls.denoiser_timestep_scale or pipe.scheduler.config.num_train_timesteps

    def pick_expert(module, args, kwargs):
        t = torch.as_tensor(kwargs.get("timestep", args[1] if len(args) > 1 else None))
        pipe.set_adapters("low_noise" if float(t.flatten()[0]) < boundary else "high_noise")

    getattr(pipe, cls.denoiser_name).register_forward_pre_hook(pick_expert, with_kwargs=True)


def card_scheduler(out: Path) -> dict | None:
    """The scheduler change the run's model card gives for its LoRA (models.noise.run_scheduler_change)."""
    from omegaconf import OmegaConf

    from models.noise import run_scheduler_change
    from tuner.config.families import family_class

    cfg = OmegaConf.load(out / ".hydra" / "config.yaml")
    return run_scheduler_change(family_class(cfg.model.family).noise_schedule, cfg.model)



def sample(family: str, pipe, recipe: Recipe, seeds: int) -> tuple[list[int], list[int], object]:
    """Every class prompt, ``seeds`` seeds each: (labels, predicted classes, the images)."""
    import numpy as np
    import torch

    from tuner.config.families import family_class

    cls = family_class(family)
    size = recipe.size
    contrast = recipe.contrast or contrast_for(family, size)
    labels, images, clips = [], [], []
    edit, video = task_of(family, recipe) == "edit", task_of(family, recipe) == "motion"
    for label in range(len(CLASSES)):
        extra = cls.sampling_inputs(size, size, pipe)
        if video:  # the motion task: a clip as long as the training clips
            extra["num_frames"] = MOTION_FRAMES
        elif "num_frames" in extra:  # a video family on images (1-frame clips): an image
            extra["num_frames"] = 1
        if edit:  # the edit task: the class's reference is the input, the instruction the same for all
            extra["image"] = class_image(EDIT_SOURCE[label], contrast, size)
        elif "image" in extra:  # an upscaler: the class's own low-res image
            factor = size // extra["image"].shape[-1]
            extra["image"] = low_res(label, factor, contrast, size)
        if recipe.true_cfg:
            extra.update(true_cfg_scale=recipe.guidance_scale, negative_prompt="")
        if recipe.text_tokens:  # as trained
            extra["max_sequence_length"] = recipe.text_tokens
        for seed in range(seeds):
            out = pipe(
                prompt=EDIT_CAPTION if edit else motion_caption(label) if video else caption(label),  # by name (FLUX.2)
                **extra,
                num_inference_steps=recipe.sampling_steps,
                guidance_scale=1.0 if recipe.true_cfg else recipe.guidance_scale,
                height=size,
                width=size,
                output_type="np",
                generator=torch.Generator().manual_seed(seed),
            )
            frames = getattr(out, "frames", None)  # a video pipeline's (B, F, H, W, 3)
            if video:
                clips.append(np.asarray(frames[0], np.float32))
            images.append(np.asarray(out.images[0] if frames is None else frames[0][len(frames[0]) // 2], np.float32))
            labels.append(label)
    images = np.stack(images)
    if video:  # the motion task: the nearest class clip; the grid shows each clip's middle frame
        return labels, nearest_class(np.stack(clips), motion_templates(contrast, size)), images
    return labels, nearest_class(images, templates(contrast, size)), images


def save_grid(images, path: Path) -> None:
    """The samples, one row per class."""
    import numpy as np
    from PIL import Image

    rows = np.split(images, len(CLASSES))
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    Image.fromarray((grid.clip(0, 1) * 255).astype(np.uint8)).save(path)


def learn(family: str, finetune: str, work: Path, seeds: int = 4, extra=(), recipe: Recipe | None = None) -> dict:
    """Train ``family`` on the toy set and score its samples: accuracy, times, where the grid is. A full
    fine-tune starts from the learnable pipeline's random denoiser; a LoRA from a base (``pretrain``)."""
    from tuner.config.families import write_tiny

    recipe = recipe or RECIPES.get(family, Recipe())
    pipe_dir = write_tiny(recipe.tiny or family, work / "pipelines" / (recipe.tiny or family), learnable=True)
    base_s = 0.0
    if finetune != "full":
        pipe_dir, base_s = pretrain(family, pipe_dir, work, recipe, extra)
    contrast = recipe.contrast or contrast_for(family, recipe.size)
    task = task_of(family, recipe)
    if task == "edit":
        pairs = write_edit_set(work / f"edit-{recipe.size}-{contrast}", contrast, recipe.size)
        data, extra = pairs / "targets", (*extra, f"data.conditioning.reference.path={pairs / 'references'}")
    elif task == "motion":
        data = write_motion_set(work / f"motion-{recipe.size}-{contrast}", contrast, recipe.size)
        extra = (*extra, f"data.num_frames={MOTION_FRAMES}")
    else:
        data = write_toy_set(work / f"toy-{recipe.size}-{contrast}", contrast, recipe.size)
    out = work / "runs" / f"{family}-{finetune}"
    if finetune == "full":
        train_s = train_full(family, pipe_dir, data, out, recipe, extra)
    else:
        train_s = train(family, pipe_dir, data, out, finetune, recipe, extra)
    start = time.perf_counter()
    labels, predicted, images = sample(family, load_trained(family, pipe_dir, out, finetune), recipe, seeds)
    save_grid(images, out / "learn_grid.png")
    accuracy = sum(p == t for p, t in zip(predicted, labels, strict=True)) / len(labels)
    return {"accuracy": accuracy, "train_s": train_s, "base_s": base_s, "sample_s": time.perf_counter() - start,
            "grid": str(out / "learn_grid.png")}


def recipe_for(family: str, changes: list[str]) -> Recipe:
    """The family's recipe with ``field=value`` changes (from the command line)."""
    pairs = [change.split("=", 1) for change in changes]
    caption = family in CAPTION_RECIPES and ["task", "caption"] in pairs  # a video family on images: its own recipe
    recipe = CAPTION_RECIPES[family] if caption else RECIPES.get(family, Recipe())
    types = {f.name: str(f.type) for f in dataclasses.fields(recipe)}  # "int", "bool", "str | None", ...
    unknown = [key for key, _ in pairs if key not in types]
    if unknown:
        raise SystemExit(f"--recipe: unknown field(s) {unknown}; valid: {sorted(types)}")
    return dataclasses.replace(recipe, **{key: _value(types[key], value) for key, value in pairs})


def _value(kind: str, text: str):
    """A command-line value as the field's type (``kind``, its annotation): bool("false") would be True, and a
    field that defaults to None has no type to call."""
    if "None" in kind and text.lower() in ("none", "null"):
        return None
    if kind.startswith("bool"):
        return text.lower() in ("1", "true", "yes")
    return int(text) if kind.startswith("int") else float(text) if kind.startswith("float") else text


def main(argv: list[str] | None = None) -> int:
    from tuner.config.families import families

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="*", default=None, help="families (default: every one in conf/model/)")
    parser.add_argument("--finetune", nargs="*", default=["lora", "full"], choices=["lora", "full", "experts"],
                        help="experts: a two-expert run (model.experts=two_lora) on the LoRA's base, sampled with both")
    parser.add_argument("--seeds", type=int, default=8, help="samples per class")
    parser.add_argument("--work", type=Path, default=None,
                        help="pipelines, toy set and runs (default bench/.learn; --smoke: a temporary folder)")
    parser.add_argument("--set", nargs="*", default=[], help="extra train.py overrides for every run (key=value)")
    parser.add_argument("--recipe", nargs="*", default=[], help="Recipe fields to change (steps=500 lr_lora=1e-2)")
    parser.add_argument("--smoke", action="store_true", help="SD 1.5's LoRA, a few steps, 1 seed: the code path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.family, args.finetune, args.seeds = ["sd15"], ["lora"], 1
        args.recipe = ["base_steps=2", "lora_steps=2", "batch_size=2", "sampling_steps=2", *args.recipe]
    with tempfile.TemporaryDirectory(prefix="learn.") as tmp:
        work = args.work or (Path(tmp) if args.smoke else ROOT / "bench" / ".learn")
        figures = {}
        for family in args.family or list(families()):
            accs = []
            for finetune in args.finetune:
                result = learn(family, finetune, work, args.seeds, extra=args.set, recipe=recipe_for(family, args.recipe))
                accs.append(result["accuracy"])
                print(f"learn_acc_{family}_{finetune}={result['accuracy']:.3f}  "
                      f"# base {result['base_s']:.0f} s, train {result['train_s']:.0f} s, sample {result['sample_s']:.0f} s, {result['grid']}", flush=True)
            figures[f"learn_acc_{family}"] = min(accs)
            print(f"learn_acc_{family}={min(accs):.3f}", flush=True)
        figures["learn_acc_min"] = min(figures.values())
        (work / "last.json").write_text(json.dumps({"learn_acc_min": figures["learn_acc_min"]}))
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
