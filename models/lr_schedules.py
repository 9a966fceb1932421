"""Learning-rate schedules, one function per ``conf/lr_scheduler/*.yaml``.

Each is built by Hydra as a partial and completed by the module with the optimiser and the run's
total optimiser steps. ``warmup_steps`` is a linear ramp from 0 that every schedule shares. The
curves themselves are diffusers' (``diffusers.optimization``).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def constant(optimizer: Optimizer, num_training_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """The base LR throughout, after an optional linear warm-up."""
    from diffusers.optimization import get_constant_schedule_with_warmup

    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps)


def cosine(optimizer: Optimizer, num_training_steps: int, warmup_steps: int = 0, num_cycles: float = 0.5) -> LambdaLR:
    """Half a cosine from the base LR to 0 over the run (``num_cycles`` = 0.5), after warm-up."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=num_training_steps, num_cycles=num_cycles
    )


def linear(optimizer: Optimizer, num_training_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """A straight line from the base LR to 0 over the run, after warm-up."""
    from diffusers.optimization import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=num_training_steps
    )


def cosine_with_restarts(
    optimizer: Optimizer, num_training_steps: int, warmup_steps: int = 0, num_cycles: float = 3
) -> LambdaLR:
    """``num_cycles`` cosines from the base LR to 0, each restarting at the base LR, after warm-up."""
    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

    return get_cosine_with_hard_restarts_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=num_training_steps, num_cycles=int(num_cycles)
    )


def polynomial(
    optimizer: Optimizer, num_training_steps: int, warmup_steps: int = 0, lr_end: float = 1e-7, power: float = 1.0
) -> LambdaLR:
    """From the base LR to ``lr_end`` as ``(1 - progress) ** power``, after warm-up."""
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup

    return get_polynomial_decay_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=num_training_steps, lr_end=lr_end, power=power
    )


def sine(
    optimizer: Optimizer,
    num_training_steps: int,
    warmup_steps: int = 0,
    cycles: float = 1.0,
    min_lr_ratio: float = 0.1,
) -> LambdaLR:
    """tuner's sine schedule. With ``w`` warm-up steps, ``T`` steps in all and ``r = min_lr_ratio``::

        factor(t) = t / w                                            for t < w
        p = (t - w) / (T - w)                                        progress after warm-up, 0 to 1
        factor(t) = r + (1 - r) * (1 + cos(2 pi * cycles * p)) / 2   for t >= w

    so the LR starts at the base LR, swings smoothly down to ``r`` times it and back, ``cycles`` times
    (no jumps, unlike cosine with hard restarts), and ends at the base LR for a whole number of cycles.
    """
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"lr_scheduler.min_lr_ratio={min_lr_ratio}; valid: 0 to 1")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, num_training_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(2 * math.pi * cycles * progress)) / 2

    return LambdaLR(optimizer, factor)
