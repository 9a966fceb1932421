"""A Lightning callback that records when each training batch starts and writes the times to a JSON file when
training ends (bench/data.py adds it with ``+callbacks.extra.steps._target_=bench.step_timer.StepStarts``), so a
bench times tuner's own Trainer without reaching into how tuner builds it."""

import json
import time
from pathlib import Path

import lightning as L


class StepStarts(L.Callback):
    """``time.perf_counter()`` at every batch start: from one to the next is a whole step, loading included."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args) -> None:
        self.path.write_text(json.dumps(self.starts))
