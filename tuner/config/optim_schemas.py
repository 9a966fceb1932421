"""Typed schemas of the optimizer and lr_scheduler groups: one dataclass per option, each pulled into
its YAML with ``/schema/<group>/<name>@_here_`` (see ``tuner.config.register``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


@dataclass
class OptimizerConfig:
    _target_: str = MISSING
    _partial_: bool = True
    _convert_: str = "all"
    lr: float = 1e-4
    weight_decay: float = 1e-2
    # bf16 weights (model.weight_dtype=bf16) updated in fp32 and rounded to bf16 at random (models/rounding.py);
    # tuner's, not the optimiser's: it works with every optimiser
    stochastic_rounding: bool = False


@dataclass
class AdamWConfig(OptimizerConfig):
    """torch.optim.AdamW; ``fused``/``foreach`` null lets torch pick the fastest for the device."""

    _target_: str = "torch.optim.AdamW"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    fused: bool | None = None
    foreach: bool | None = None


@dataclass
class Adam8bitConfig(OptimizerConfig):
    """bitsandbytes' 8-bit AdamW: optimiser state in 8 bits, block-wise (runs on CPU too)."""

    _target_: str = "bitsandbytes.optim.AdamW8bit"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class LionConfig(OptimizerConfig):
    """Lion (Chen et al. 2023): sign updates, one moment; use a 3-10x smaller lr than AdamW."""

    _target_: str = "bitsandbytes.optim.Lion"
    lr: float = 2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])


@dataclass
class StableAdamWConfig(OptimizerConfig):
    """torch-optimi's StableAdamW (the seed's optimi-stableadamw): AdamW with update clipping."""

    _target_: str = "optimi.StableAdamW"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-6


@dataclass
class ProdigyConfig(OptimizerConfig):
    """Prodigy (Mishchenko & Defazio 2023) estimates the step size itself: lr stays 1.0."""

    _target_: str = "prodigyopt.Prodigy"
    lr: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    d_coef: float = 1.0
    use_bias_correction: bool = True
    safeguard_warmup: bool = True


@dataclass
class AdafactorConfig(OptimizerConfig):
    """transformers' Adafactor with an explicit lr (relative steps and parameter scaling off)."""

    _target_: str = "transformers.optimization.Adafactor"
    lr: float = 1e-4
    weight_decay: float = 0.0
    relative_step: bool = False
    scale_parameter: bool = False
    warmup_init: bool = False
    clip_threshold: float = 1.0


@dataclass
class LRSchedulerConfig:
    _target_: str = MISSING
    _partial_: bool = True
    warmup_steps: int = 0


@dataclass
class CosineSchedulerConfig(LRSchedulerConfig):
    num_cycles: float = 0.5  # 0.5: one half-cosine to 0; with restarts, the number of restarts


@dataclass
class PolynomialSchedulerConfig(LRSchedulerConfig):
    lr_end: float = 1e-7
    power: float = 1.0


@dataclass
class SineSchedulerConfig(LRSchedulerConfig):
    cycles: float = 1.0
    min_lr_ratio: float = 0.1


def optim_problems(optimizer, lr_scheduler, max_train_steps) -> list[str]:
    """Impossible optimiser and schedule numbers, each as ``key=value; what is valid`` (empty: all fine).

    Checked before anything loads: torch would otherwise refuse them only once the model is built."""
    problems = []
    lr = optimizer.get("lr")
    if lr is not None and not lr > 0:
        problems.append(f"optimizer.lr={lr}; it must be above 0 (e.g. 1e-4)")
    weight_decay = optimizer.get("weight_decay")
    if weight_decay is not None and not 0 <= weight_decay <= 1:
        problems.append(f"optimizer.weight_decay={weight_decay}; valid: 0 to 1 (e.g. 1e-2)")
    betas = optimizer.get("betas")
    if betas is not None and not all(0 <= b < 1 for b in betas):
        problems.append(f"optimizer.betas={list(betas)}; each must be at least 0 and below 1 (e.g. [0.9, 0.999])")
    eps = optimizer.get("eps")
    if eps is not None and not eps > 0:
        problems.append(f"optimizer.eps={eps}; it must be above 0 (e.g. 1e-8)")
    warmup = lr_scheduler.get("warmup_steps", 0)
    if warmup is not None and warmup < 0:
        problems.append(f"lr_scheduler.warmup_steps={warmup}; it must be >= 0")
    elif warmup and max_train_steps and max_train_steps > 0 and warmup > max_train_steps:
        problems.append(
            f"lr_scheduler.warmup_steps={warmup} is more than max_train_steps={max_train_steps}: the learning rate "
            "would never reach optimizer.lr; lower warmup_steps"
        )
    for key in ("num_cycles", "cycles", "power"):
        value = lr_scheduler.get(key)
        if value is not None and not value > 0:
            problems.append(f"lr_scheduler.{key}={value}; it must be above 0")
    for key in ("lr_end", "min_lr_ratio"):
        value = lr_scheduler.get(key)
        if value is not None and value < 0:
            problems.append(f"lr_scheduler.{key}={value}; it must be >= 0")
    return problems
