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
