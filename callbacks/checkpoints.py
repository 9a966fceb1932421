"""Step checkpoints as directories: ``<output_dir>/checkpoints/<step>/``.

Each holds the Lightning checkpoint (``checkpoint.ckpt``: trainable weights, optimiser, scheduler,
loop and data-sampler state), the weights in diffusers format (usable on their own) and
``tracker_state.json``. A checkpoint is written under a temporary name and renamed when whole; the
limit removes old checkpoints only after that.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
import zipfile
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.ema import EMA

log = logging.getLogger(__name__)

CKPT_NAME = "checkpoint.ckpt"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.isdigit() and (p / CKPT_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name))


def readable(path: Path) -> bool:
    """Whether a ``.ckpt`` (a zip archive, as torch.save writes it) is whole: its index at the end opens."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def resolve_checkpoint(spec: str | None, root: str | os.PathLike) -> str | None:
    """``latest`` -> the newest complete checkpoint under ``root`` (None if there is none);
    a step directory or a ``.ckpt`` path -> that file."""
    if not spec:
        return None
    if spec == "latest":
        for candidate in reversed(list_checkpoints(root)):
            if readable(candidate / CKPT_NAME):
                return str(candidate / CKPT_NAME)
            log.warning("checkpoint %s is damaged; trying the one before it", candidate)
        return None
    path = Path(spec)
    if path.is_dir():
        path = path / CKPT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"resume_from_checkpoint={spec!r}: no checkpoint at {path}")
    return str(path)


class StepCheckpoint(Checkpoint):
    """Save every ``every_n_steps`` optimiser steps and at the last step; keep at most ``total_limit``.

    A ``Checkpoint`` subclass, so Lightning runs it after every other callback's hooks: the EMA has
    taken its step before the checkpoint is written."""

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int | None, total_limit: int | None = None):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.total_limit = total_limit
        self._last_saved = -1
        self.interrupted_at: int | None = None  # the step a SIGTERM / Ctrl-C stopped the run at

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_saved = trainer.global_step  # never re-save the step we resumed from
        if trainer.is_global_zero:
            self._set_aside_later_checkpoints(trainer.global_step)
        trainer.strategy.barrier("tuner.checkpoint.start")
        self._catch_signals(trainer)

    # ---- preemption and Ctrl-C -----------------------------------------------------------------
    def _catch_signals(self, trainer: L.Trainer) -> None:
        """SIGTERM (cluster preemption) and a first Ctrl-C both ask Lightning to stop after the current
        step, through its own SIGTERM flag, which it broadcasts to every DDP rank; ``on_exception`` then
        writes the checkpoint. A second Ctrl-C interrupts at once. (Registered here, after Lightning has
        installed its own handlers at fit start.)"""
        if threading.current_thread() is not threading.main_thread():
            return
        connector = trainer._signal_connector  # Lightning keeps its stop flag here

        def handler(signum, frame):
            if signum == signal.SIGINT and connector.received_sigterm:
                raise KeyboardInterrupt
            log.warning("received %s: finishing this step, then writing a checkpoint", signal.Signals(signum).name)
            connector.received_sigterm = True

        self._previous_handlers = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.interrupted_at = trainer.global_step
            if trainer.global_step > max(self._last_saved, 0):
                self.save(trainer, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, previous in getattr(self, "_previous_handlers", {}).items():
            signal.signal(signum, previous)
        self._previous_handlers = {}

    def _set_aside_later_checkpoints(self, step: int) -> None:
        """Checkpoints past the step this run starts from belong to another history (a fresh start in a
        used output_dir, or a resume from an older checkpoint). They are renamed out of the way, not
        deleted, so that neither ``latest`` nor the limit mistakes them for this run's."""
        later = [p for p in list_checkpoints(self.dirpath) if int(p.name) > step]
        for path in later:
            aside = path.with_name(f"superseded-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            log.warning("checkpoint %s is past this run's start (step %d); kept as %s", path, step, aside.name)

    def _is_last_batch(self, trainer: L.Trainer) -> bool:
        if 0 < trainer.max_steps <= trainer.global_step:
            return True
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs - 1
        return trainer.max_steps < 0 and last_epoch and trainer.is_last_batch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if step <= 0 or step == self._last_saved:
            return
        periodic = bool(self.every_n_steps) and step % self.every_n_steps == 0
        if periodic or self._is_last_batch(trainer):
            self.save(trainer, pl_module)

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        step = trainer.global_step
        final = self.dirpath / str(step)
        tmp = self.dirpath / f".tmp-{step}"
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        trainer.strategy.barrier("tuner.checkpoint.mkdir")
        trainer.save_checkpoint(tmp / CKPT_NAME, weights_only=False)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:
            pl_module.save_weights(tmp, full_pipeline=False)
            for callback in trainer.callbacks:
                if isinstance(callback, EMA) and callback.shadow is not None:  # the EMA weights beside them
                    callback.export(pl_module, tmp, full_pipeline=False)
            (tmp / "tracker_state.json").write_text(json.dumps(self.tracker_state(trainer), indent=1))
            old = None
            if final.exists():  # replaced only once the new one is whole, and never left missing
                old = final.with_name(f".old-{step}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint saved: %s", final)
            self._prune()
        trainer.strategy.barrier("tuner.checkpoint.done")
        self._last_saved = step
        return final

    def tracker_state(self, trainer: L.Trainer) -> dict:
        datamodule = trainer.datamodule
        batch_size = getattr(datamodule, "batch_size", 1)
        batches = trainer.fit_loop.total_batch_idx + 1
        return {
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "images_seen": batches * batch_size * trainer.world_size,
            "data": datamodule.state_dict() if datamodule is not None else {},
        }

    def _prune(self) -> None:
        if not self.total_limit or self.total_limit < 1:
            return
        for old in list_checkpoints(self.dirpath)[: -self.total_limit]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint removed (checkpoints_total_limit=%d): %s", self.total_limit, old)


class FinalExport(L.Callback):
    """At the end of training (rank 0): the weights in diffusers format and the model card, before the
    Hub callback pushes them. ``done`` stays false when fit had nothing to do (an early end on resume),
    so the caller exports then."""

    def __init__(self, output_dir: str | os.PathLike, card_info: dict | None = None):
        self.output_dir = Path(output_dir)
        self.card_info = dict(card_info or {})
        self.done = False
        self.weights: Path | None = None

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from callbacks.model_card import write_model_card

        if trainer.is_global_zero:
            self.weights = pl_module.save_weights(self.output_dir)
            for callback in trainer.callbacks:
                if isinstance(callback, EMA) and callback.shadow is not None:
                    callback.export(pl_module, self.output_dir)
            write_model_card(self.output_dir, {**self.card_info, "steps": trainer.global_step})
        self.done = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)
