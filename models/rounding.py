"""Stochastic rounding for weights that train in bf16 (``model.weight_dtype=bf16`` with
``optimizer.stochastic_rounding=true``), as OneTrainer and kohya's ``--full_bf16`` runs do.

A bf16 weight near 1 moves in steps of 2^-8; an optimiser update below half of that rounds to nothing, every
step, so a small learning rate trains nothing. Here each step's update is computed in fp32 and the result
rounded to one of its two bf16 neighbours at random, in proportion to how near it is: the expected weight is
the fp32 one, and many small updates add up.

The optimiser never sees a bf16 weight: before its update (Lightning's ``on_before_optimizer_step``, after
backward) each bf16 weight and its gradient become fp32, and after it (a step post-hook) the weight is rounded
back. Its state is therefore created and kept in fp32, and ``load_state_dict`` restores it so (torch would cast
it to the weight's bf16). The random bits come from a generator seeded by the run's seed and the step, the same
on every rank (the weights stay identical under DDP), so a resumed run rounds as a straight one does.
"""

from __future__ import annotations

import hashlib

import torch


def stochastic_round(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 ``x`` -> bf16, each element rounded up or down in magnitude with probability proportional to its
    distance from the two bf16 neighbours: a random 16-bit number is added to the 16 bits bf16 drops, which are
    then cut off. Non-finite values keep their value."""
    bits = x.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)  # the low 16 bits are zero: exact in bf16
    return torch.where(torch.isfinite(x), rounded, x.float()).to(torch.bfloat16)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The rounding's generator of one optimiser step: the same on every rank."""
    digest = hashlib.sha256(f"round:{seed}:{step}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class StochasticRounding:
    """The bf16 weights of one optimiser, updated in fp32 and rounded back at random (see the module docstring).
    ``seed_and_step`` gives the run's seed and the step being taken."""

    def __init__(self, optimizer: torch.optim.Optimizer, seed_and_step):
        self.optimizer, self.seed_and_step = optimizer, seed_and_step
        self.widened: list[torch.nn.Parameter] = []
        optimizer.register_step_post_hook(lambda *_: self.round_back())
        optimizer.register_load_state_dict_pre_hook(lambda *_: self._widen(all_weights=True))
        optimizer.register_load_state_dict_post_hook(lambda *_: self._narrow())

    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _widen(self, all_weights: bool = False) -> None:
        for p in self.params():
            if p.dtype == torch.bfloat16 and (all_weights or p.grad is not None):
                p.data = p.data.float()
                if p.grad is not None:
                    p.grad = p.grad.float()
                self.widened.append(p)

    def _narrow(self) -> None:  # exact: the values were bf16 a moment ago
        for p in self.widened:
            p.data = p.data.to(torch.bfloat16)
            if p.grad is not None:
                p.grad = p.grad.to(torch.bfloat16)
        self.widened = []

    def before_step(self) -> None:
        """After backward, before the update (and before clipping, which then sees fp32 gradients)."""
        self._widen()

    @torch.no_grad()
    def round_back(self) -> None:
        if not self.widened:
            return
        seed, step = self.seed_and_step()
        generators: dict[torch.device, torch.Generator] = {}
        for p in self.widened:
            generator = generators.setdefault(p.device, step_generator(seed, step, p.device))
            p.data = stochastic_round(p.data, generator)
            p.grad = None if p.grad is None else p.grad.to(torch.bfloat16)
        self.widened = []
