"""Validation: sample images from fixed prompts and seeds, and a comparable validation loss.

The pipeline is the family's own diffusers pipeline assembled from the in-memory modules
(``module.pipeline()``); nothing is reloaded from disk. The loss is the diffusion loss at fixed
timesteps with fixed noise over fixed batches, so it can be compared across steps and sweep jobs.
"""

from __future__ import annotations

import json
import logging
import math
import re
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from PIL import Image

from callbacks.ema import EMA
from callbacks.video_out import frame_strip, log_clip, write_clip

log = logging.getLogger(__name__)

USE_EMA = ("live", "ema", "both")


def shortname(prompt: str, taken: set[str]) -> str:
    """A file-name-safe short name for a prompt, unique among ``taken``."""
    base = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40] or "prompt"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def load_prompts(prompts: list[str], library: str | None) -> dict[str, str]:
    """``{shortname: prompt}`` from the inline prompts and a ``{shortname: prompt}`` JSON library file."""
    named: dict[str, str] = {}
    taken: set[str] = set()
    for prompt in prompts:
        named[shortname(prompt, taken)] = prompt
    if library:
        entries = json.loads(Path(library).read_text(encoding="utf-8"))
        if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
            raise ValueError(f"callbacks.validation.prompt_library={library!r} must map short names to prompts")
        for key, prompt in entries.items():
            named[shortname(key, taken)] = prompt
    return named


def load_inputs(paths: list[str], names: list[str]) -> dict[str, Image.Image]:
    """``{prompt shortname: its input image}``, RGB, one path per prompt in order; read once, here, so a missing
    or unreadable file fails at the start of the run, not at its first validation."""
    if not paths:
        return {}
    if len(paths) != len(names):
        raise ValueError(f"callbacks.validation.inputs lists {len(paths)} images for {len(names)} prompts")
    inputs = {}
    for name, path in zip(names, paths, strict=True):
        try:
            with Image.open(path) as img:
                inputs[name] = img.convert("RGB")
        except OSError as err:
            raise ValueError(f"callbacks.validation.inputs: cannot read {path!r} ({err})") from err
    return inputs


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        sheet.paste(img.resize((w, h)), ((i % columns) * w, (i // columns) * h))
    return sheet


class Validation(L.Callback):
    def __init__(
        self,
        output_dir: str,
        every_n_steps: int | None = None,
        prompts: list[str] | None = None,
        prompt_library: str | None = None,
        negative_prompt: str = "",
        guidance_scale: float = 7.5,
        num_inference_steps: int = 25,
        width: int = 1024,
        height: int = 1024,
        seed: int = 42,
        use_ema: str = "both",
        loss_batches: int = 4,
        loss_levels: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
        loss_timesteps: tuple[int, ...] | None = None,
        inputs: list[str] | None = None,
        fps: float = 16.0,
    ):
        """``inputs``: an edit model's input image for each prompt (paths, in the prompts' order), handed to the
        pipeline as ``image=``; the grid then shows each input beside its output. ``fps``: a video family's
        clips (``sample_image`` returns their frames) are written at it, each beside its frame strip."""
        if use_ema not in USE_EMA:
            raise ValueError(f"callbacks.validation.use_ema={use_ema!r}; valid: {', '.join(USE_EMA)}")
        self.output_dir = Path(output_dir)
        self.every_n_steps = every_n_steps
        self.prompts = load_prompts(list(prompts or []), prompt_library)
        self.inputs = load_inputs(list(inputs or []), list(self.prompts))
        self.fps = fps
        self.negative_prompt, self.guidance_scale = negative_prompt, guidance_scale
        self.num_inference_steps, self.width, self.height, self.seed = num_inference_steps, width, height, seed
        self.use_ema, self.loss_batches, self.loss_levels = use_ema, loss_batches, tuple(loss_levels)
        self.loss_timesteps = tuple(loss_timesteps) if loss_timesteps else None  # the DDPM alias of the levels
        self._last_step = -1
        self.history: list[tuple[int, float]] = []  # (step, val/loss)

    # ---- when -----------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    # ---- what -----------------------------------------------------------------------------------
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        try:
            if trainer.is_global_zero:
                loss = self.validation_loss(trainer, pl_module)
                if loss is not None:
                    self.history.append((trainer.global_step, loss))
                    # Straight to the loggers at this step (self.log from a callback would be filed a
                    # step late, and again at epoch end).
                    for logger in trainer.loggers:
                        logger.log_metrics({"val/loss": loss}, step=trainer.global_step)
                if self.prompts:
                    self.sample(trainer, pl_module)
        finally:
            pl_module.train(was_training)
        trainer.strategy.barrier("tuner.validation")

    @property
    def last_loss(self) -> float | None:
        return self.history[-1][1] if self.history else None

    def _ema(self, trainer: L.Trainer) -> EMA | None:
        return next((c for c in trainer.callbacks if isinstance(c, EMA) and c.shadow is not None), None)

    @torch.no_grad()
    def validation_loss(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "fixed_batches"):
            return None
        total, n = 0.0, 0
        restore = pl_module.encoders_on_device()  # held-out images are not in the latent cache
        with trainer.precision_plugin.forward_context():
            for i, batch in enumerate(datamodule.fixed_batches(self.loss_batches)):
                batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                generator = torch.Generator().manual_seed(self.seed + i)  # the same noise every time
                for level in self._levels(pl_module):  # fractions of the noise schedule, for DDPM and flow alike
                    total += float(pl_module.compute_loss(batch, generator, fixed_level=level))
                    n += 1
        restore()
        return total / n if n else None

    def _levels(self, pl_module: L.LightningModule) -> tuple[float, ...]:
        if self.loss_timesteps is None:
            return self.loss_levels
        n = pl_module.noise.num_timesteps  # the schedule's own count (1000 for SD, 1100 for Kolors)
        return tuple(t / n for t in self.loss_timesteps)

    @torch.no_grad()
    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = self._ema(trainer)
        variants = [("", nullcontext())]
        if ema is not None and self.use_ema in ("ema", "both"):
            variants = [("_ema", ema.swapped(pl_module))] + (variants if self.use_ema == "both" else [])
        folder = self.output_dir / "validation" / f"step_{trainer.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        restore = pl_module.encoders_on_device()
        experts = pl_module.sampling_context() if hasattr(pl_module, "sampling_context") else nullcontext()
        try:
            with experts:  # a two-expert run: each timestep sampled by its own expert
                pipe = pl_module.pipeline()
                pipe.set_progress_bar_config(disable=True)
                produced: list[tuple[str, Image.Image]] = []
                shown: list[Image.Image] = []  # the grid: each output after its input image, if it has one
                clips: dict[str, tuple] = {}  # a video family's (file, frames), by the image's name
                for suffix, context in variants:
                    with context:
                        for name, prompt in self.prompts.items():
                            given = {"image": self.inputs[name]} if self.inputs else {}
                            image = pl_module.sample_image(
                                pipe,
                                prompt,
                                **given,
                                autocast=trainer.precision_plugin.forward_context(),
                                negative_prompt=self.negative_prompt or None,
                                num_inference_steps=self.num_inference_steps,
                                guidance_scale=self.guidance_scale,
                                width=self.width,
                                height=self.height,
                                generator=torch.Generator("cpu").manual_seed(self.seed),
                            )
                            if isinstance(image, list):  # a video family's clip: the .mp4, and its strip
                                path = write_clip(image, folder / f"{name}{suffix}", self.fps)
                                clips[f"{name}{suffix}"] = (path, image)
                                image = frame_strip(image)
                            image.save(folder / f"{name}{suffix}.png")
                            produced.append((f"{name}{suffix}", image))
                            shown += [self.inputs[name].resize(image.size), image] if self.inputs else [image]
        finally:
            restore()
        grid(shown, columns=(2 if self.inputs else 1) * len(self.prompts)).save(folder / "grid.png")
        self._publish(trainer, produced, clips)
        log.info("validation images: %s", folder)

    def _publish(self, trainer: L.Trainer, produced: list[tuple[str, Image.Image]], clips: dict) -> None:
        for logger in trainer.loggers:
            if clips:  # videos where the logger takes them (each strip is the still the webhook and card show)
                for name, img in produced:
                    log_clip(logger, f"validation/{name}", *clips[name], self.fps, trainer.global_step, img)
            elif hasattr(logger, "log_image"):  # wandb
                logger.log_image(
                    "validation",
                    [img for _, img in produced],
                    step=trainer.global_step,
                    caption=[name for name, _ in produced],
                )
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # tensorboard
                import numpy as np

                for name, img in produced:
                    logger.experiment.add_image(
                        f"validation/{name}", np.asarray(img), trainer.global_step, dataformats="HWC"
                    )
        for callback in trainer.callbacks:
            if hasattr(callback, "send_images"):  # the webhook: grouped by prompt
                import io

                files = []
                for name, img in produced:
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    files.append((f"{name}.png", buf.getvalue()))
                callback.send_images(f"validation, step {trainer.global_step}", files)
