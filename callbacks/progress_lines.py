"""The step bar's replacement when stdout is not a terminal (a file, SLURM, nohup): one plain line at a steady
rate, ``step 120/600 (20%)  loss 0.1234  lr 1.00e-04  3.21 it/s  ETA 2m30s``, with no carriage returns.

A line is printed once both ``every_s`` seconds and ``every_percent``% of the steps have passed since the last
one (whichever is rarer), and a last one at the end. Speed and ETA are measured over that interval; a resumed
run counts from the step it resumed at.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar


def steps_between_lines(total: int | None, every_percent: float) -> int:
    """The fewest optimiser steps between two lines: ``every_percent``% of ``total`` (at least one step)."""
    if not total or every_percent <= 0:
        return 1
    return max(1, math.ceil(total * every_percent / 100))


def line_due(steps_since: int, seconds_since: float, min_steps: int, every_s: float) -> bool:
    """Whether a line is due: both the step and the time intervals have passed since the last line."""
    return steps_since >= min_steps and seconds_since >= every_s


def format_duration(seconds: float) -> str:
    """``45s``, ``2m30s``, ``1h02m``; ``?`` when not known."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_line(step: int, total: int | None, loss: float | None, lr: float | None, rate: float) -> str:
    """One progress line: step (of total, with percent), loss, lr, steps per second and ETA."""
    parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
    parts.append(f"loss {loss:.4f}" if loss is not None else "loss -")
    parts.append(f"lr {lr:.2e}" if lr is not None else "lr -")
    parts.append(f"{rate:.2f} it/s")
    if total:
        parts.append(f"ETA {format_duration((total - step) / rate if rate > 0 else math.inf)}")
    return "  ".join(parts)


class StepProgressLines(ProgressBar):
    """Plain progress lines on stdout, in optimiser steps over the whole run (see the module's docstring)."""

    def __init__(
        self,
        every_s: float = 30.0,
        every_percent: float = 1.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        self.every_s = every_s
        self.every_percent = every_percent
        self._stream = stream  # None: sys.stdout as it is when a line is printed
        self._clock = clock
        self._enabled = True
        self._total: int | None = None
        self._min_steps = 1
        self._last_step = 0
        self._last_time = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, file=self._stream or sys.stdout, flush=True, **kwargs)

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        total = trainer.estimated_stepping_batches
        self._total = int(total) if math.isfinite(total) and total > 0 else None
        self._min_steps = steps_between_lines(self._total, self.every_percent)
        self._last_step = trainer.global_step  # a resumed run counts from where it resumed
        self._last_time = self._clock()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if not self._enabled or step == self._last_step:
            return  # mid gradient accumulation, or another rank
        now = self._clock()
        last = step == self._total
        if last or line_due(step - self._last_step, now - self._last_time, self._min_steps, self.every_s):
            self._emit(trainer, step, now)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and trainer.global_step != self._last_step:
            self._emit(trainer, trainer.global_step, self._clock())  # the final line, wherever the run stopped

    def _emit(self, trainer: L.Trainer, step: int, now: float) -> None:
        elapsed = now - self._last_time
        rate = (step - self._last_step) / elapsed if elapsed > 0 else 0.0
        self.print(format_line(step, self._total, _loss(trainer), _lr(trainer), rate))
        self._last_step, self._last_time = step, now


def _loss(trainer: L.Trainer) -> float | None:
    """The last step's training loss, as the step bar shows it."""
    metrics = trainer.progress_bar_metrics
    value = metrics.get("train/loss_step", metrics.get("train/loss"))
    return float(value) if value is not None else None


def _lr(trainer: L.Trainer) -> float | None:
    """The first parameter group's learning rate, read where it lives."""
    if not trainer.optimizers:
        return None
    return float(trainer.optimizers[0].param_groups[0]["lr"])
