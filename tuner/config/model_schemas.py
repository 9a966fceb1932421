"""Typed schemas of the ``model`` group: the family-independent model keys, the adapter settings and their
enums. Part of tuner/config/__init__.py's schema (it re-exports these); nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING


class Finetune(Enum):
    lora = "lora"
    full = "full"
    lycoris = "lycoris"  # LoKr / LoHa through the lycoris-lora library (model.lycoris.*), as SimpleTuner offers


class ControlMode(Enum):
    lora = "lora"  # a control LoRA: the control image's latents concatenated on channels (FluxControlPipeline)


class LycorisAlgo(Enum):
    lokr = "lokr"  # Kronecker product (factor)
    loha = "loha"  # Hadamard product of two low-rank pairs


class PredictionType(Enum):
    epsilon = "epsilon"
    v_prediction = "v_prediction"


class TimestepSampling(Enum):
    uniform = "uniform"  # DDPM: uniform integer timesteps; flow: uniform sigmas
    logit_normal = "logit_normal"  # flow: sigmoid of N(logit_mean, logit_std) (SD3's default)
    mode = "mode"  # flow: mode-seeking density, heavier tails (mode_scale)


class Expert(Enum):
    high_noise = "high_noise"  # composition and large shapes: noise levels from expert_boundary up
    low_noise = "low_noise"  # fine detail: noise levels below expert_boundary


class Experts(Enum):
    two_lora = "two_lora"  # both split-schedule experts in one run: two LoRA adapters on the one base


class LossWeighting(Enum):
    none = "none"
    sigma_sqrt = "sigma_sqrt"  # flow: sigma^-2
    cosmap = "cosmap"  # flow: 2 / (pi (1 - 2 sigma + 2 sigma^2))


class CompileMode(Enum):  # torch.compile's modes
    default = "default"
    reduce_overhead = "reduce-overhead"  # CUDA graphs: fixed shapes, so one graph per bucket
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class WeightDtype(Enum):  # the trained weights' dtype (the LoRA, or the whole denoiser of a full fine-tune)
    fp32 = "fp32"  # fp32 master weights; mixed_precision sets the compute dtype
    bf16 = "bf16"  # half the memory; with optimizer.stochastic_rounding small updates still add up


class LossType(Enum):  # kohya sd-scripts' --loss_type (models/objectives.py)
    l2 = "l2"
    huber = "huber"  # pseudo-Huber: 2c (sqrt(d^2 + c^2) - c)
    smooth_l1 = "smooth_l1"  # 2 (sqrt(d^2 + c^2) - c)


class HuberSchedule(Enum):  # the Huber threshold over the noise level, from 1 (no noise) to huber_c (pure noise)
    constant = "constant"  # huber_c at every level
    exponential = "exponential"  # huber_c ^ level
    snr = "snr"  # (1 - huber_c) / (1 + 1/sqrt(SNR))^2 + huber_c


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float | None = None  # None: equal to rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the family's default
    use_dora: bool = False  # DoRA (peft): each layer's weight as magnitude x direction, the LoRA on the direction
    plus_ratio: float | None = None  # LoRA+: the B matrices learn at optimizer.lr x this (16 is usual); None: off
    # Text-encoder LoRA (kohya's default when not network_train_unet_only): the text encoders named here get a LoRA
    # of the same rank and alpha, trained with the denoiser's; the text-embedding cache is then off
    text_encoders: list[str] = field(default_factory=list)
    text_encoder_lr: float | None = None  # their learning rate; None: optimizer.lr
    text_encoder_target_modules: list[str] | None = None  # None: the family's (CLIP: q/k/v/out_proj)


@dataclass
class LycorisConfig:
    """``model.lycoris``: the adapter when ``model.finetune=lycoris`` (SimpleTuner's lycoris_config.json keys:
    algo, linear_dim -> rank, linear_alpha -> alpha, factor)."""

    algo: LycorisAlgo = LycorisAlgo.lokr
    rank: int = 10000  # LoKr: a rank this large means full-rank factors (SimpleTuner's linear_dim default)
    alpha: float = 1.0
    factor: int = 16  # LoKr's Kronecker factor; -1: the library picks
    dropout: float = 0.0


@dataclass
class ModelConfig:
    _target_: str = MISSING
    _convert_: str = "all"
    family: str = MISSING
    pretrained_model_name_or_path: str = MISSING  # a diffusers folder, a Hub id, or one .safetensors checkpoint
    base_config: str | None = None  # a single-file base's diffusers layout (configs, tokenizers); None: the family's
    denoiser_file: str | None = None  # a denoiser-only file replacing the base's denoiser (Flux fine-tunes)
    revision: str | None = None
    variant: str | None = None
    finetune: Finetune = Finetune.lora
    lora: LoraConfig = field(default_factory=LoraConfig)
    lycoris: LycorisConfig = field(default_factory=LycorisConfig)
    gradient_checkpointing: bool = False
    weight_dtype: WeightDtype = WeightDtype.fp32  # bf16: needs mixed_precision=bf16 (kohya's --full_bf16)
    # torch.compile the denoiser in place (nn.Module.compile: weights and their names unchanged); the first steps of
    # each new bucket shape compile (dynamic=None: torch marks a shape dynamic once it changes)
    compile: bool = False
    compile_mode: CompileMode | None = None  # None: torch's default
    compile_dynamic: bool | None = None
    compile_backend: str = "inductor"  # "aot_eager" / "eager": dynamo's capture only, to rule the compiler out
    prediction_type: PredictionType | None = None  # DDPM; None: from the checkpoint's scheduler config
    timestep_sampling: TimestepSampling = TimestepSampling.uniform
    logit_mean: float = 0.0  # flow, logit_normal
    logit_std: float = 1.0
    mode_scale: float = 1.29  # flow, mode
    flow_shift: float | None = None  # flow: the SD3 shift; None: the checkpoint scheduler's `shift`
    loss_weighting: LossWeighting = LossWeighting.none  # flow
    loss_type: LossType = LossType.l2
    huber_c: float = 0.1  # huber, smooth_l1: the threshold (at pure noise, when scheduled)
    huber_schedule: HuberSchedule = HuberSchedule.snr  # huber, smooth_l1: the threshold over the noise level
    # The noise range trained on, as fractions of the schedule (DDPM: t / T; flow: sigma), for every family.
    min_noise_level: float = 0.0
    max_noise_level: float = 1.0
    # The seed's mixture-of-experts split: this run trains one expert, on its part of the noise range only.
    expert: Expert | None = None
    expert_boundary: float = 0.35  # the low-noise expert owns levels below it (SimpleTuner's refiner strength)
    experts: Experts | None = None  # two_lora: train both experts in this run, one LoRA adapter each
    expert_partner: str | None = None  # the other expert's weights (LoRA file/folder, pipeline/): chained validation
    min_timestep: int | None = None  # DDPM alias of min_noise_level, in timesteps (0..T-1 of the schedule)
    max_timestep: int | None = None  # DDPM alias of max_noise_level (exclusive)
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    min_snr_gamma: float | None = None
    zero_terminal_snr: bool = False
    prior_loss_weight: float = 1.0  # loss weight of regularisation (prior-preservation) images
    masked_loss: bool = False  # weight the loss by each image's mask (data.conditioning.mask or data.mask_from_alpha)
    control: ControlMode | None = None  # lora: train a control LoRA on data.conditioning.control (Flux.1 dev)
    options: dict[str, Any] = field(default_factory=dict)  # family-only knobs, checked against the family's Options
