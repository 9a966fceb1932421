"""Exponential moving average of the trainable weights (the LoRA, or the whole denoiser).

Only what trains is averaged, so a LoRA's shadow is megabytes; the frozen base is never copied (as
Lightning's ``WeightAveraging``, which deep-copies the whole module, would). The shadow is fp32, can
live on the CPU, is part of the checkpoint (``state_dict``), and starts equal to the weights at step 0.

Under a sharded strategy (``trainer=fsdp``) each rank averages its own shard of each weight, in place,
with no communication. A sharded checkpoint keeps the averages sharded (the strategy writes each rank's
shard beside its weights: ``shards_callback_state``); a one-file checkpoint gathers them into whole
tensors, and a resume splits them again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)


def gathered_weights(trainer: L.Trainer, pl_module: L.LightningModule):
    """Around code where rank 0 writes the module's weights; every rank enters it. Under a sharded strategy
    (its ``gathered_weights``: tuner.runtime.scale.DenoiserFSDP) rank 0's denoiser gives full tensors of what trains
    inside; under any other strategy it does nothing."""
    gather = getattr(trainer.strategy, "gathered_weights", None)
    return gather(pl_module) if gather is not None else nullcontext()


def _is_sharded(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"  # a DTensor (FSDP2 shard); torch.distributed may be absent


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded weight (it shares the weight's storage), else the tensor itself."""
    return t.to_local() if _is_sharded(t) else t


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
        self.shadow: dict[str, torch.Tensor] | None = None  # under sharding: this rank's shard of each
        self.last_step = -1
        self._pending: dict | None = None
        self._sharded: dict[str, torch.Tensor] = {}  # name -> the live sharded weight (its layout)
        self._device: torch.device | None = None  # where the shadow lives; set at fit start
        self._names: set[str] = set()
        self._keep_sharded = False  # the strategy writes sharded tensors in a checkpoint as they are

    @property
    def state_key(self) -> str:
        return "EMA"

    def current_decay(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def _live(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        live = self._live(pl_module)
        self._device = torch.device("cpu") if self.on_cpu else pl_module.device
        self._sharded = {k: p for k, p in live.items() if _is_sharded(p)}
        self._keep_sharded = bool(getattr(trainer.strategy, "shards_callback_state", False))
        self._names = set(live)
        if self._pending is None and self.shadow is None:
            self.shadow = {k: _local(p).detach().to(self._device, torch.float32, copy=True) for k, p in live.items()}
        self._restore()

    def _restore(self) -> None:
        """Take a checkpoint's shadow once both it and the module's layout are known: Lightning restores
        callbacks before ``on_fit_start`` under most strategies, after it under a sharded one."""
        if self._pending is None or self._device is None:
            return
        shadow = self._pending["shadow"]
        self.shadow = {k: self._split(k, v).to(self._device, torch.float32) for k, v in shadow.items()}
        self.last_step = self._pending["last_step"]
        self._pending = None
        missing = self._names - set(self.shadow)
        if missing:
            raise ValueError(f"the checkpoint's EMA lacks {len(missing)} trainable weights, e.g. {min(missing)!r}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._device = None  # a later fit takes its own module's layout

    def _split(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a saved shadow: of a whole one, or of one the strategy gave back sharded
        (the tensor itself for an unsharded weight)."""
        if _is_sharded(full):
            return full.to_local()
        if name not in self._sharded:
            return full
        from torch.distributed.tensor import distribute_tensor

        p = self._sharded[name]
        # every rank read the same checkpoint: each cuts its own piece, nothing is sent
        return distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()

    def _saved(self, name: str, shadow: torch.Tensor) -> torch.Tensor:
        """What a checkpoint holds of a weight's average: this rank's shard as a DTensor where the strategy
        writes those shard by shard, else the whole tensor on the CPU (for a sharded weight a collective:
        every rank calls it)."""
        if name not in self._sharded:
            return shadow.cpu()
        from torch.distributed.tensor import DTensor

        p = self._sharded[name]
        piece = DTensor.from_local(shadow.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        return piece if self._keep_sharded else piece.full_tensor().cpu()

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
        values = [_local(p).detach().to(s.device, torch.float32) for p, s in zip(live.values(), shadows, strict=True)]
        torch._foreach_lerp_(shadows, values, 1.0 - decay)  # shadow += (1 - decay) * (value - shadow)
        pl_module.log("ema/decay", decay, on_step=True, on_epoch=False, rank_zero_only=True)

    @contextmanager
    def swapped(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Inside, the module's trainable weights are the EMA ones (for sampling or export)."""
        live = {k: _local(p) for k, p in self._live(pl_module).items()}  # under sharding, this rank's shards
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

    def export(self, pl_module: L.LightningModule, directory: str | Path, full_pipeline: bool = True) -> Path | None:
        """The EMA weights beside the live ones: ``pytorch_lora_weights_ema.safetensors`` / ``pipeline_ema/``.
        Rank 0 writes; under a sharded strategy every rank must call it (the averaged shards are gathered)."""
        trainer = pl_module.trainer
        with self.swapped(pl_module), gathered_weights(trainer, pl_module):
            if trainer.is_global_zero:
                return pl_module.save_weights(directory, full_pipeline=full_pipeline, suffix="_ema")
        return None

    def state_dict(self) -> dict:
        """The averages (``_saved``); under sharding every rank calls this (Lightning does, for a checkpoint)."""
        if self.shadow is None:
            return {}
        return {"shadow": {k: self._saved(k, v) for k, v in self.shadow.items()}, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._pending = state_dict
            self._restore()  # a sharded strategy restores after on_fit_start
