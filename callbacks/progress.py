"""One progress bar over the whole run, in optimiser steps, with loss, learning rate, it/s and ETA.

Lightning's bars restart every epoch and, in step mode, show the epoch count against an unknown total
(``Epoch 4/-2``); a LoRA run is thought of in steps.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    @property
    def train_description(self) -> str:
        return "steps"  # from the bar's first render (Lightning's would show a "Training" bar first)

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.unit = "step"
        return bar

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=int(trainer.estimated_stepping_batches))
        bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.n = trainer.global_step
        bar.set_description("steps")
        bar.unit = "step"
        self._last = trainer.global_step

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the run, not one per epoch

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning leaves the bar's line open on an error, and the error's one line was printed after it
        # on the same line: closing the bar ends its line.
        if self.train_progress_bar is not None and not self.train_progress_bar.disable:
            self.train_progress_bar.close()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar is None or trainer.global_step == self._last:
            return  # mid gradient accumulation
        bar.update(trainer.global_step - self._last)
        self._last = trainer.global_step
        metrics = self.get_metrics(trainer, pl_module)
        metrics["epoch"] = trainer.current_epoch
        bar.set_postfix(metrics, refresh=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if trainer.optimizers:  # read where it lives, instead of logging it every step to show it here
            metrics["lr"] = f"{trainer.optimizers[0].param_groups[0]['lr']:.3g}"
        return metrics
