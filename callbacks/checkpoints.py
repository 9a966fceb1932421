"""Step checkpoints as directories: ``<output_dir>/checkpoints/<step>/``.

Each holds the Lightning checkpoint (``checkpoint.ckpt``: trainable weights, optimiser, scheduler,
loop and data-sampler state), the weights in diffusers format (usable on their own) and
``tracker_state.json``. A checkpoint is written under a temporary name and renamed when whole; the
limit removes old checkpoints only after that.
"""

from __future__ import annotations

import errno
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

from callbacks.ema import EMA, gathered_weights
from callbacks.preemption import PREEMPT_SIGNAL

log = logging.getLogger(__name__)

CKPT_NAME = "checkpoint.ckpt"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    # checkpoint.ckpt is a file, or a folder under a sharded strategy (trainer=fsdp; readable() says which)
    found = [p for p in root.iterdir() if p.name.isdigit() and (p / CKPT_NAME).exists()]
    return sorted(found, key=lambda p: int(p.name))


def readable(path: Path) -> bool:
    """Whether a ``.ckpt`` (a zip archive, as torch.save writes it) is whole: its index at the end opens. A
    sharded checkpoint is a folder (PyTorch's distributed checkpoint: a file per rank, then the index
    ``.metadata``, written last) with Lightning's ``meta.pt`` (everything but the tensors) beside them."""
    path = Path(path)
    if path.is_dir():
        return (path / ".metadata").is_file() and readable(path / "meta.pt")
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from or written; the message is one line for the user."""


def intact_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root`` whose ``.ckpt`` opens, oldest step first."""
    return [p for p in list_checkpoints(root) if readable(p / CKPT_NAME)]


def _intact_text(root: Path) -> str:
    intact = intact_checkpoints(root)
    if not intact:
        return f"no intact checkpoint in {root}"
    return f"intact checkpoints in {root}: {', '.join(p.name for p in intact)} (resume_from_checkpoint=latest takes {intact[-1].name})"


def resolve_checkpoint(spec: str | None, root: str | os.PathLike) -> str | None:
    """``latest`` -> the newest complete checkpoint under ``root`` (None if there is none);
    a step directory or a ``.ckpt`` path -> that file. A missing or damaged file is a CheckpointError
    that lists the intact checkpoints beside it."""
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
    beside = path.parent.parent if path.parent.name.isdigit() else Path(root)
    if not path.is_file():
        raise CheckpointError(f"resume_from_checkpoint={spec!r}: no checkpoint at {path}; {_intact_text(beside)}")
    if not readable(path):
        raise CheckpointError(
            f"resume_from_checkpoint={spec!r}: {path} is damaged (truncated or half-written); {_intact_text(beside)}"
        )
    return str(path)


def check_resumable(ckpt_path: str | os.PathLike, identity: dict) -> None:
    """Compare the model a checkpoint was trained with (``tracker_state.json`` beside it) with this run's,
    before any weights load. Family, fine-tuning mode and adapter settings must match; a different base
    model path only warns (the same weights may have moved)."""
    tracker = Path(ckpt_path).parent / "tracker_state.json"
    try:
        saved = json.loads(tracker.read_text()).get("model")
    except (OSError, ValueError):  # a .ckpt on its own: the same record is inside it
        import torch

        saved = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False).get("tuner_model")
    if saved:
        compare_identity(saved, identity, str(Path(ckpt_path).parent))


def compare_identity(saved: dict, current: dict, where: str) -> None:
    differ = [k for k in current if k != "base_model" and k in saved and saved[k] != current[k]]
    if differ:
        parts = "; ".join(f"{k}: checkpoint {saved[k]!r}, this run {current[k]!r}" for k in differ)
        raise CheckpointError(
            f"checkpoint {where} was trained with another model setup ({parts}); resume it with the same "
            "settings, or start a new output_dir"
        )
    old, new = saved.get("base_model"), current.get("base_model")
    if old != new and str(old).startswith("sha256:") and str(new).startswith("sha256:"):  # both hashes of files
        raise CheckpointError(
            f"checkpoint {where} was trained on another base model (file {old}, this run's {new}); resume with "
            "the file it was trained on, or start a new output_dir"
        )
    if saved.get("base_model") not in (None, current.get("base_model")):
        log.warning(
            "checkpoint %s was trained on %s; resuming on %s", where, saved["base_model"], current.get("base_model")
        )


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
        self.images_seen: int | None = 0  # counted as batches are drawn, so a batch-size change is honest
        self._stop_requested = False  # SIGTERM / Ctrl-C seen; the run stops at the next optimiser step
        self._step_seen = 0
        self.preempted_by: int | None = None  # the cluster's preemption signal, when that stopped the run
        self.requeue_handler = None  # the handler that signal had before (submitit's requeue)

    def state_dict(self) -> dict:
        return {"images_seen": self.images_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.images_seen = state_dict.get("images_seen")  # None: a checkpoint from before the count

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_saved = trainer.global_step  # never re-save the step we resumed from
        self._step_seen = trainer.global_step
        self._stop_requested = False
        if self.images_seen is None:  # estimated once, for checkpoints written before images were counted
            per_step = getattr(trainer.datamodule, "batch_size", 1) * trainer.accumulate_grad_batches
            self.images_seen = trainer.global_step * per_step * trainer.world_size
        if trainer.is_global_zero:
            self._set_aside_later_checkpoints(trainer.global_step)
        trainer.strategy.barrier("tuner.checkpoint.start")
        self._catch_signals(trainer)

    # ---- preemption and Ctrl-C -----------------------------------------------------------------
    def _catch_signals(self, trainer: L.Trainer) -> None:
        """SIGTERM, a first Ctrl-C and the cluster's preemption warning (tuner/runtime/cluster.py) ask the run to
        stop after the current optimiser step; ``on_exception`` then writes the checkpoint. A second Ctrl-C
        interrupts at once. (Registered here, after Lightning has installed its own handlers at fit start.)"""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if signum == signal.SIGINT and self._stop_requested:
                raise KeyboardInterrupt
            log.warning("received %s: finishing this step, then writing a checkpoint", signal.Signals(signum).name)
            if signum == PREEMPT_SIGNAL:
                self.preempted_by = signum
            self._stop_requested = True

        signals = (signal.SIGTERM, signal.SIGINT, PREEMPT_SIGNAL)
        self._previous_handlers = {s: signal.signal(s, handler) for s in dict.fromkeys(signals)}
        self.requeue_handler = self._previous_handlers.get(PREEMPT_SIGNAL)

    def _stop_now(self, trainer: L.Trainer) -> bool:
        """Whether a requested stop takes effect now: only once an optimiser step is complete, and on
        every DDP rank at the same step (rank 0 decides). Lightning's own SIGTERM check runs after every
        micro-batch, and its exception-time state can sit past an epoch's end; stopping here, with the
        checkpoint written exactly as a periodic one, keeps the saved data position on the saved step."""
        stepped = trainer.global_step != self._step_seen
        self._step_seen = trainer.global_step
        if not stepped:
            return False
        stop = self._stop_requested
        if trainer.world_size > 1:
            stop = bool(trainer.strategy.broadcast(stop, src=0))
        return stop

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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args) -> None:
        if isinstance(batch, dict) and "captions" in batch:
            self.images_seen = (self.images_seen or 0) + len(batch["captions"]) * trainer.world_size
        stop = self._stop_now(trainer)
        step = trainer.global_step
        periodic = bool(self.every_n_steps) and step % self.every_n_steps == 0
        if step > 0 and step != self._last_saved and (periodic or stop or self._is_last_batch(trainer)):
            self.save(trainer, pl_module)
        if stop:  # Lightning stops the loop through its own flag, and the run ends cleanly from there
            self.interrupted_at = step
            trainer._signal_connector.received_sigterm = True

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        step = trainer.global_step
        refuse_nonfinite(trainer, pl_module, f"checkpoint {step}")
        final = self.dirpath / str(step)
        tmp = self.dirpath / f".tmp-{step}"
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        trainer.strategy.barrier("tuner.checkpoint.mkdir")
        try:
            # every rank calls it; rank 0 writes (under a sharded strategy each rank writes its shard)
            trainer.save_checkpoint(tmp / CKPT_NAME, weights_only=False)
            with gathered_weights(trainer, pl_module):  # every rank: a sharded run gathers what trains
                if trainer.is_global_zero:
                    pl_module.save_weights(tmp, full_pipeline=False)
            for callback in trainer.callbacks:
                if isinstance(callback, EMA) and callback.shadow is not None:  # the EMA weights beside them
                    callback.export(pl_module, tmp, full_pipeline=False)  # every rank; rank 0 writes
            if trainer.is_global_zero:
                tracker = self.tracker_state(trainer, pl_module)
                (tmp / "tracker_state.json").write_text(json.dumps(tracker, indent=1))
        except Exception as err:
            if trainer.is_global_zero:
                self._fail(err, tmp, step)
            raise
        if trainer.is_global_zero:
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

    def _fail(self, err: Exception, tmp: Path, step: int) -> None:
        """A checkpoint that could not be written: remove the partial one now (not at the next start), and
        when the disk is full say so in one line, with the space it needs and the last whole checkpoint."""
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        intact = intact_checkpoints(self.dirpath)
        need = sum(f.stat().st_size for f in intact[-1].rglob("*") if f.is_file()) if intact else written
        free = shutil.disk_usage(self.dirpath).free
        errnos = {getattr(e, "errno", None) for e in _chain(err)}
        full = bool(errnos & {errno.ENOSPC, errno.EDQUOT}) or any("No space left" in str(e) for e in _chain(err))
        if not full and free >= need:
            return  # some other failure: Lightning reports it as it is
        last = f"the last whole checkpoint is {intact[-1]}" if intact else "no checkpoint of this run is whole yet"
        raise CheckpointError(
            f"disk full: could not write checkpoint {step} to {self.dirpath} (it needs about {_size(need)}, "
            f"{_size(free)} free); {last}; free some space and resume with resume_from_checkpoint=latest"
        ) from err

    def tracker_state(self, trainer: L.Trainer, pl_module: L.LightningModule | None = None) -> dict:
        datamodule = trainer.datamodule
        state = {
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "images_seen": self.images_seen,
            "data": datamodule.state_dict() if datamodule is not None else {},
        }
        if pl_module is not None and hasattr(pl_module, "run_identity"):
            state["model"] = pl_module.run_identity()  # compared before a resume loads any weight
        return state

    def _prune(self) -> None:
        if not self.total_limit or self.total_limit < 1:
            return
        for old in list_checkpoints(self.dirpath)[: -self.total_limit]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint removed (checkpoints_total_limit=%d): %s", self.total_limit, old)


def refuse_nonfinite(trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> None:
    """Weights holding a NaN or infinity are never saved: every rank checks its own (shards included) and
    all stop together, leaving the last checkpoint written as ``latest``."""
    import torch

    names = pl_module.nonfinite_weights() if hasattr(pl_module, "nonfinite_weights") else []
    count = torch.tensor(float(len(names)))
    if trainer.world_size > 1:
        count = trainer.strategy.reduce(count.to(trainer.strategy.root_device), reduce_op="sum").cpu()
    if float(count) > 0:
        example = f" (e.g. {names[0]})" if names else " (on another rank)"
        raise CheckpointError(
            f"{what} not written: {int(count)} trainable tensors hold NaN or infinity{example}; the last checkpoint "
            "stays latest; try a lower optimizer.lr or max_grad_norm=1.0"
        )


def _chain(err: BaseException):
    """The exception and its causes: torch and safetensors wrap the OSError of a full disk."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class FinalExport(L.Callback):
    """At the end of training: the weights in diffusers format and the model card (rank 0 writes; every rank
    takes part, as a sharded denoiser is gathered for it), before the Hub callback pushes them. ``done`` stays false when fit had nothing to do (an early end on resume),
    so the caller exports then."""

    def __init__(self, output_dir: str | os.PathLike, card_info: dict | None = None):
        self.output_dir = Path(output_dir)
        self.card_info = dict(card_info or {})
        self.done = False
        self.weights: Path | None = None

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from callbacks.model_card import write_model_card

        refuse_nonfinite(trainer, pl_module, "the final export")
        with gathered_weights(trainer, pl_module):  # FSDP: whole weights on rank 0 (tuner/runtime/scale.py)
            if trainer.is_global_zero:
                self.weights = pl_module.save_weights(self.output_dir)
        for callback in trainer.callbacks:
            if isinstance(callback, EMA) and callback.shadow is not None:
                callback.export(pl_module, self.output_dir)  # every rank; rank 0 writes
        if trainer.is_global_zero:
            write_model_card(self.output_dir, {**self.card_info, "steps": trainer.global_step})
        self.done = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)
