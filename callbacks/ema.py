"""Exponential moving average of the trainable weights (the LoRA, or the whole denoiser).

Only what trains is averaged, so a LoRA's shadow is megabytes; the frozen base is never copied (as
Lightning's ``WeightAveraging``, which deep-copies the whole module, would). The shadow is fp32, can
live on the CPU, is part of the checkpoint (``state_dict``), and starts equal to the weights at step 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)


class EMA(L.Callback):
    """``shadow = decay * shadow + (1 - decay) * weights`` every ``update_every_n_steps`` optimiser steps.

    With ``warmup`` the decay ramps as ``min(decay, (1 + step) / (10 + step))``, so early shadows are not
    dominated by the random LoRA initialisation (the ramp of Tarvainen & Valpola's mean teacher and of
    diffusers' ``EMAModel``).
    """

    def __init__(
        self,
        decay: float = 0.995,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        on_cpu: bool = False,
    ):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay}; it must be between 0 and 1")
        self.decay, self.warmup, self.every, self.on_cpu = decay, warmup, max(1, update_every_n_steps), on_cpu
        self.shadow: dict[str, torch.Tensor] | None = None
        self.last_step = -1
        self._pending: dict | None = None

    @property
    def state_key(self) -> str:
        return "EMA"

    def current_decay(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def _live(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        live = self._live(pl_module)
        device = torch.device("cpu") if self.on_cpu else pl_module.device
        if self._pending is not None:  # restored from a checkpoint
            self.shadow = {k: v.to(device, torch.float32) for k, v in self._pending["shadow"].items()}
            self.last_step = self._pending["last_step"]
            self._pending = None
            missing = set(live) - set(self.shadow)
            if missing:
                raise ValueError(f"the checkpoint's EMA lacks {len(missing)} trainable weights, e.g. {min(missing)!r}")
        elif self.shadow is None:
            self.shadow = {k: p.detach().to(device, torch.float32, copy=True) for k, p in live.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if step == self.last_step or step % self.every:
            return
        self.last_step = step
        decay = self.current_decay(step)
        live = self._live(pl_module)
        if hasattr(pl_module, "parameters_to_average"):  # a two-expert run: the experts that trained (a shadow each)
            live = {k: live[k] for k in pl_module.parameters_to_average(list(live))}
        shadows = [self.shadow[k] for k in live]
        values = [p.detach().to(s.device, torch.float32) for p, s in zip(live.values(), shadows, strict=True)]
        torch._foreach_lerp_(shadows, values, 1.0 - decay)  # shadow += (1 - decay) * (value - shadow)
        pl_module.log("ema/decay", decay, on_step=True, on_epoch=False, rank_zero_only=True)

    @contextmanager
    def swapped(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Inside, the module's trainable weights are the EMA ones (for sampling or export)."""
        live = self._live(pl_module)
        saved = {k: p.detach().clone() for k, p in live.items()}
        with torch.no_grad():
            for k, p in live.items():
                p.copy_(self.shadow[k].to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in live.items():
                    p.copy_(saved[k])

    def export(self, pl_module: L.LightningModule, directory: str | Path, full_pipeline: bool = True) -> Path:
        """The EMA weights beside the live ones: ``pytorch_lora_weights_ema.safetensors`` / ``pipeline_ema/``."""
        with self.swapped(pl_module):
            return pl_module.save_weights(directory, full_pipeline=full_pipeline, suffix="_ema")

    def state_dict(self) -> dict:
        if self.shadow is None:
            return {}
        return {"shadow": {k: v.cpu() for k, v in self.shadow.items()}, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._pending = state_dict
