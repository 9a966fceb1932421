"""A Lightning callback that writes the wall time when the first optimiser step ends (bench/startup.py adds it
with ``+callbacks.extra.startup._target_=bench.startup_marker.FirstStep``)."""

import time
from pathlib import Path

import lightning as L


class FirstStep(L.Callback):
    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= 1 and not self.path.exists():
            self.path.write_text(repr(time.time()))
