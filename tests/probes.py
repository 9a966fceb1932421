"""Probes that let tests see inside: Lightning callbacks that tests add to a ``python train.py`` run
(``+callbacks.extra.NAME._target_=probes.X`` with ``tests`` on PYTHONPATH), and the family tests' look at what a
denoiser is handed."""

import gc
import json
from pathlib import Path

import lightning as L


class GarbageCollector(L.Callback):
    """Writes whether the cyclic garbage collector is on when training starts, and its per-generation stats."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.write_text(json.dumps({"enabled": gc.isenabled(), "stats": gc.get_stats()}))


def denoiser_calls(module) -> list[dict]:
    """The keyword arguments of every call of ``module``'s transformer from now on, in order: what a training step
    and what the family's pipeline hand it, to compare."""
    seen: list[dict] = []
    module.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    return seen


def quiet_pipeline(module):
    """The family's pipeline from the in-memory modules, without its progress bars."""
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fill_nan(value) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _fill_nan(item)
    elif hasattr(value, "is_floating_point") and value.is_floating_point():
        value.fill_(float("nan"))


class NaNBatch(L.Callback):
    """Fills the image inputs (latents or pixels) of the batches of the given optimiser steps (1-based) with NaN,
    as a corrupt batch would arrive: on every rank, or on ``rank`` alone."""

    def __init__(self, steps: list[int], rank: int | None = None):
        self.steps, self.rank = set(steps), rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step + 1 in self.steps and self.rank in (None, trainer.global_rank):
            for key in ("encoded", "pixels"):
                if key in batch:
                    _fill_nan(batch[key])


class PoisonWeights(L.Callback):
    """Writes NaN into the first trainable tensor once the given optimiser step is done (a corrupted update)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.requires_grad).data.fill_(float("nan"))
