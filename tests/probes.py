"""Lightning callbacks that tests add to a ``python train.py`` run (``+callbacks.extra.NAME._target_=probes.X``
with ``tests`` on PYTHONPATH) to see inside the process."""

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
