"""Learning-rate schedules, one function per ``conf/lr_scheduler/*.yaml``.

Each is built by Hydra as a partial and completed by the module with the optimiser and the run's
total optimiser steps. ``warmup_steps`` is a linear ramp from 0 that every schedule shares. The
curves themselves are diffusers' (``diffusers.optimization``).
"""

from __future__ import annotations

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
