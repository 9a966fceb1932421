"""A step whose loss or gradients are not finite never reaches the weights (``on_nonfinite``).

``stop`` (the default) ends the run with one line naming the step and what to try; no checkpoint or
export is written after it, so ``latest`` stays the last good checkpoint. ``skip`` drops the step (no
parameter or optimiser-state update), counts it, and stops once ``max_nonfinite_skips`` steps in a row
were dropped. The decision is taken on every rank alike (a sharded run's gradient shards differ).

Under fp16's loss scaling, infinite gradients are the scaler's business (it skips the step and lowers the
scale), so only a non-finite loss counts there.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

POLICIES = ("stop", "skip")


def advice(trainer, scaled: bool) -> str:
    """What to try, of what the run does not do already."""
    tips = ["a lower optimizer.lr"]
    if scaled:
        tips.append("mixed_precision=bf16 instead of fp16")
    if not trainer.gradient_clip_val:
        tips.append("max_grad_norm=1.0")
    return "try " + ", ".join(tips)


class NonFiniteError(RuntimeError):
    """The run stopped on a non-finite loss or gradient (a one-line user error)."""


class NonFiniteGuard:
    def __init__(self, policy: str = "stop", max_skips: int = 10):
        if policy not in POLICIES:
            raise ValueError(f"on_nonfinite={policy!r}: expected one of {', '.join(POLICIES)}")
        self.policy, self.max_skips = policy, max_skips
        self.skipped = 0  # steps dropped in all
        self.in_a_row = 0
        self._loss_ok: torch.Tensor | None = None

    def note_loss(self, loss: torch.Tensor) -> None:
        """Each micro-batch's loss, kept as a tensor (no device sync until the optimiser step)."""
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def drop_step(self, grad_norm: torch.Tensor, trainer, scaled: bool) -> bool:
        """Whether this optimiser step must be dropped; raises NonFiniteError when the run must stop.
        Called once per optimiser step, after the gradients are whole (accumulated, synced, unscaled)."""
        if hasattr(grad_norm, "full_tensor"):  # a sharded run's norm (a DTensor): the whole model's
            grad_norm = grad_norm.full_tensor()
        loss_ok = self._loss_ok if self._loss_ok is not None else torch.tensor(True)
        self._loss_ok = None
        grad_ok = torch.tensor(True) if scaled else torch.isfinite(grad_norm)
        flags = torch.stack([~loss_ok.cpu(), ~grad_ok.cpu()]).float()
        if trainer.world_size > 1:  # one verdict for every rank
            flags = trainer.strategy.reduce(flags.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        bad_loss, bad_grad = bool(flags[0] > 0), bool(flags[1] > 0)
        if not (bad_loss or bad_grad):
            self.in_a_row = 0
            return False
        step = trainer.global_step + 1
        what = "the loss is not finite" if bad_loss else f"the gradient norm is {float(grad_norm)} (the loss was finite)"
        if self.policy == "stop":
            raise NonFiniteError(
                f"step {step}: {what}; stopped before it reached the weights (no checkpoint or export was "
                f"written after step {step - 1}; resume_from_checkpoint=latest continues from the last one); "
                f"{advice(trainer, scaled)}, or on_nonfinite=skip to drop such steps"
            )
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_skips:
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} steps in a row were dropped because {what} "
                f"(max_nonfinite_skips={self.max_skips}; {self.skipped} dropped in all); {advice(trainer, scaled)}"
            )
        log.warning(
            "step %d: %s; step dropped (%d in a row, %d in all; the run stops at max_nonfinite_skips=%d in a row)",
            step, what, self.in_a_row, self.skipped, self.max_skips,
        )
        return True

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))
