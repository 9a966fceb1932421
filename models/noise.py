"""Noise schedules: the one part of the objective that differs between DDPM and flow-matching families.

A family declares its kind (``noise_schedule = "ddpm" | "flow"``); the base builds the matching strategy
from the checkpoint's scheduler config and the model keys, and the training step asks it for timesteps,
the noised input, the target and the per-sample loss weights. Everything else in the step (latents,
noise, offset noise, input perturbation, caption dropout, the weighted MSE) is shared.

Noise ranges are **levels**, fractions of the schedule in [0, 1]: for DDPM the timestep over the number
of train timesteps, for flow the noise level σ. So ``model.min_noise_level`` / ``max_noise_level`` and
the validation loss levels mean the same for every family. (The integer ``min_timestep`` /
``max_timestep`` remain as DDPM aliases.)
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from models import objectives as obj

log = logging.getLogger(__name__)

SCHEDULE_KINDS = ("ddpm", "flow")


def noise_levels(hp: Any) -> tuple[float, float]:
    """The trained range of noise levels: ``min_noise_level``..``max_noise_level``, narrowed to one
    expert's side of ``expert_boundary`` when the run trains one (the seed's split schedule)."""
    lo, hi = float(hp.min_noise_level), float(hp.max_noise_level)
    expert = getattr(hp, "expert", None)
    if expert == "low_noise":
        hi = min(hi, hp.expert_boundary)
    elif expert == "high_noise":
        lo = max(lo, hp.expert_boundary)
    return lo, hi


class DDPMSchedule:
    """Discrete timesteps over ᾱ_t (Ho et al. 2020), with epsilon or v targets and min-SNR weighting."""

    kind = "ddpm"

    def __init__(self, scheduler_config: dict, hp: Any):
        from diffusers import DDPMScheduler

        self.config = dict(scheduler_config)
        # Training needs only its noise schedule; DDPM's sampling options (clip_sample) never apply.
        sched = DDPMScheduler.from_config(self.config, clip_sample=False)
        betas = sched.betas
        self.zero_terminal_snr = bool(hp.zero_terminal_snr)
        if self.zero_terminal_snr:
            betas = obj.rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas.float(), 0)
        if self.zero_terminal_snr:
            # Exactly 0 makes SNR 0 and the epsilon min-SNR weight 0/0; diffusers' schedulers use 2^-24 too.
            alphas_cumprod[-1] = 2**-24
        self.alphas_cumprod = alphas_cumprod
        self.num_timesteps = len(alphas_cumprod)
        self.prediction_type = hp.prediction_type or sched.config.prediction_type
        if self.prediction_type not in obj.PREDICTION_TYPES:
            raise ValueError(f"model.prediction_type={self.prediction_type!r}; valid: {', '.join(obj.PREDICTION_TYPES)}")
        self.config["prediction_type"] = self.prediction_type
        if hp.timestep_sampling != "uniform":
            raise ValueError(f"model.timestep_sampling={hp.timestep_sampling!r}: DDPM families sample uniform timesteps")
        self.min_t, self.max_t = self._range(hp)
        self.min_snr_gamma = hp.min_snr_gamma
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            log.warning("zero_terminal_snr with %s prediction: the last timestep has nothing to predict", self.prediction_type)

    def _range(self, hp: Any) -> tuple[int, int]:
        """Integer bounds ``[min_t, max_t)``: the timestep aliases when set, else the levels."""
        n = self.num_timesteps
        lo_level, hi_level = noise_levels(hp)
        lo = hp.min_timestep if hp.min_timestep is not None else round(lo_level * n)
        hi = hp.max_timestep if hp.max_timestep is not None else round(hi_level * n)
        if not 0 <= lo < hi <= n:
            raise ValueError(f"noise range [{lo}, {hi}) is outside the schedule's {n} timesteps")
        return lo, hi

    def to(self, device: torch.device) -> DDPMSchedule:
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def sample(self, n: int, generator: torch.Generator, shift: float | None = None) -> torch.Tensor:
        """Timesteps for a batch, drawn from ``generator``. (B,) long. (``shift`` is a flow setting.)"""
        ts = obj.sample_timesteps(n, self.num_timesteps, generator, "uniform", self.min_t, self.max_t)
        return ts.to(self.alphas_cumprod.device)

    def mass_below(self, level: float, shift: float | None = None) -> float:
        """The share of this schedule's uniform timesteps whose level t / T is below ``level``."""
        levels = torch.arange(self.min_t, self.max_t, dtype=torch.float64) / self.num_timesteps
        return float((levels < level).double().mean())

    def at_level(self, level: float, n: int) -> torch.Tensor:
        t = min(round(level * self.num_timesteps), self.num_timesteps - 1)
        return torch.full((n,), t, dtype=torch.long, device=self.alphas_cumprod.device)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return obj.add_noise(latents, noise, self.alphas_cumprod, t)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return obj.target(self.prediction_type, latents, noise, self.alphas_cumprod, t)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        if not self.min_snr_gamma:
            return torch.ones(t.shape[0], device=t.device)
        return obj.min_snr_weights(obj.snr(self.alphas_cumprod, t), self.min_snr_gamma, self.prediction_type)

    def sampling_scheduler(self):
        """The scheduler for the exported and validation pipelines: the checkpoint's own (PNDM, DDIM,
        Euler...), except that a zero-terminal-SNR model samples with DDIM over trailing timesteps, since
        PNDM and others ignore ``rescale_betas_zero_snr`` (Lin et al. 2023, sec. 3.3), and that a model
        whose denoiser also predicts its variance (IF) samples with the fixed small one: the loss trains the
        prediction half only, so the variance half no longer fits the weights (as diffusers' DreamBooth
        scripts validate IF, ``log_validation``)."""
        import diffusers

        config = dict(self.config)
        if config.get("variance_type") in ("learned", "learned_range"):
            config["variance_type"] = "fixed_small"
        if self.zero_terminal_snr:
            config = {**config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False}
            return diffusers.DDIMScheduler.from_config(config)
        return getattr(diffusers, config.get("_class_name", "DDPMScheduler")).from_config(config)


class FlowSchedule:
    """Rectified flow: ``x_σ = (1 − σ)·x0 + σ·ε``, velocity target ``ε − x0``, σ from a density and shifted.

    The denoiser sees ``σ · num_train_timesteps`` as its timestep, as the diffusers flow pipelines feed it.
    """

    kind = "flow"
    prediction_type = "flow"

    def __init__(self, scheduler_config: dict, hp: Any):
        self.config = dict(scheduler_config)
        self.num_timesteps = int(self.config.get("num_train_timesteps", 1000))
        self.shift = float(hp.flow_shift if hp.flow_shift is not None else self.config.get("shift", 1.0))
        self.scheme, self.weighting = str(hp.timestep_sampling), str(hp.loss_weighting)
        self.logit_mean, self.logit_std, self.mode_scale = hp.logit_mean, hp.logit_std, hp.mode_scale
        if hp.min_timestep is not None or hp.max_timestep is not None:
            raise ValueError("model.min_timestep/max_timestep are DDPM timesteps; use model.min_noise_level/max_noise_level")
        self.lo, self.hi = noise_levels(hp)
        self.whole = self.lo <= 0.0 and self.hi >= 1.0
        if not self.whole:  # a range is cut from the density by its inverse CDF: refuse one without
            obj.flow_sigma_cdf(torch.tensor([self.lo]), self.scheme, self.shift, *self._density)
        self.device = torch.device("cpu")

    @property
    def _density(self) -> tuple[float, float, float]:
        return self.logit_mean, self.logit_std, self.mode_scale

    def to(self, device: torch.device) -> FlowSchedule:
        self.device = torch.device(device)
        return self

    def sample(self, n: int, generator: torch.Generator, shift: float | None = None) -> torch.Tensor:
        """``shift``: this batch's own (a resolution-dependent one), else the schedule's. A range of levels
        (min/max_noise_level, an expert's side) gets the whole shifted density truncated to it."""
        shift = self.shift if shift is None else shift
        if self.whole:  # diffusers' own draw, as every plain run has always drawn it
            u = obj.sample_flow_sigmas(n, generator, self.scheme, *self._density)
            return (obj.shift_sigmas(u, shift) * self.num_timesteps).to(self.device)  # (B,) float timesteps
        sigmas = obj.sample_flow_sigmas_in(n, generator, self.lo, self.hi, self.scheme, shift, *self._density)
        return self._timesteps_within(sigmas * self.num_timesteps)

    def _timesteps_within(self, t: torch.Tensor) -> torch.Tensor:
        """float64 timesteps as the float32 ones the denoiser gets, kept in [lo·T, hi·T): rounding to
        float32 must not carry a draw onto the upper bound, an expert boundary the other expert owns."""
        lo_t, hi_t = self.lo * self.num_timesteps, self.hi * self.num_timesteps
        low, high = torch.tensor(lo_t), torch.tensor(hi_t)  # float32, each maybe rounded past its bound
        if low.double() < lo_t:
            low = torch.nextafter(low, torch.tensor(float("inf")))
        if self.hi < 1.0 and high.double() >= hi_t:
            high = torch.nextafter(high, torch.tensor(0.0))
        return t.float().clamp(low, high).to(self.device)

    def mass_below(self, level: float, shift: float | None = None) -> float:
        """The share of this schedule's draws (at ``shift``, else its own) below ``level``: with F the whole
        shifted density's CDF, (F(level) − F(lo)) / (F(hi) − F(lo)) for a level inside the range."""
        shift = self.shift if shift is None else shift
        levels = torch.tensor([self.lo, min(max(level, self.lo), self.hi), self.hi])
        f_lo, f_level, f_hi = obj.flow_sigma_cdf(levels, self.scheme, shift, *self._density).tolist()
        if f_hi <= f_lo:  # a range the density puts no mass in
            return float(level > self.lo)
        return min(max((f_level - f_lo) / (f_hi - f_lo), 0.0), 1.0)

    def at_level(self, level: float, n: int) -> torch.Tensor:
        return torch.full((n,), float(level) * self.num_timesteps, device=self.device)

    def sigmas(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.num_timesteps

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return obj.flow_noisy(latents, noise, self.sigmas(t))

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return obj.flow_target(latents, noise)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        return obj.flow_weights(self.sigmas(t), self.weighting)

    def sampling_scheduler(self):
        import diffusers

        return getattr(diffusers, self.config.get("_class_name", "FlowMatchEulerDiscreteScheduler")).from_config(
            self.config
        )


def build(kind: str, scheduler_config: dict, hp: Any) -> DDPMSchedule | FlowSchedule:
    if kind == "ddpm":
        return DDPMSchedule(scheduler_config, hp)
    if kind == "flow":
        return FlowSchedule(scheduler_config, hp)
    raise ValueError(f"unknown noise schedule {kind!r}; valid: {', '.join(SCHEDULE_KINDS)}")


def scheduler_change(scheduler, base_config: dict) -> dict | None:
    """How a pipeline loaded from the base checkpoint (its scheduler config ``base_config``) gets
    ``scheduler``: ``{"class_name": C, "changes": {key: value}}`` for
    ``C.from_config(pipe.scheduler.config, **changes)``, or None when its own is the same. The model card's
    snippet shows it for weights loaded onto the base model (a LoRA), so they sample as validation did."""
    import json

    def plain(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    reference = type(scheduler).from_config(base_config).config
    changes = {
        k: v for k, v in scheduler.config.items() if not k.startswith("_") and plain(v) != plain(reference.get(k))
    }
    name = type(scheduler).__name__
    if not changes and name == base_config.get("_class_name"):
        return None
    return {"class_name": name, "changes": changes}


def run_scheduler_change(kind: str, hp: Any) -> dict | None:
    """``scheduler_change`` for a run of schedule ``kind`` configured by ``hp`` (its ``cfg.model``): the
    sampling scheduler it validates with and exports, against its base checkpoint's."""
    from diffusers import DDPMScheduler  # any scheduler class reads a scheduler config

    path, revision = hp.pretrained_model_name_or_path, getattr(hp, "revision", None)
    base = dict(DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision))
    return scheduler_change(build(kind, base, hp).sampling_scheduler(), base)
