"""The diffusion training objective as small pure functions.

Each takes tensors (and a ``torch.Generator`` where it draws noise) and returns tensors; none of them
touches a model. ``models/base.py`` composes them into the training step. Every scheme is named and
an unknown name raises ``ValueError``, in the manner of ``diffusers.training_utils``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SAMPLING = ("uniform",)


def randn(shape: Sequence[int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``like``'s device and dtype.

    Drawing on a CPU generator keeps runs bit-identical across devices and resumes.
    """
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    generator: torch.Generator,
    scheme: str = "uniform",
    min_timestep: int = 0,
    max_timestep: int | None = None,
) -> torch.Tensor:
    """Integer timesteps in ``[min_timestep, max_timestep)``, one per sample. Shape (B,)."""
    high = num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= min_timestep < high <= num_train_timesteps:
        raise ValueError(f"timestep range [{min_timestep}, {high}) is outside [0, {num_train_timesteps})")
    if scheme == "uniform":
        return torch.randint(min_timestep, high, (batch_size,), generator=generator, dtype=torch.long)
    raise ValueError(f"unknown timestep sampling {scheme!r}; valid: {', '.join(TIMESTEP_SAMPLING)}")


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Add a per-(sample, channel) constant to the noise, so the model can learn to shift mean brightness.

    Guttenberg 2023, "Diffusion with Offset Noise". Shape of ``noise``: (B, C, H, W), or (B, C, F, H, W) for
    video (one constant a clip and channel, over all its frames).
    """
    if strength == 0:
        return noise
    b, c = noise.shape[:2]
    return noise + strength * randn((b, c, *[1] * (noise.ndim - 2)), generator, noise)


def perturb_noise(noise: torch.Tensor, gamma: float, generator: torch.Generator) -> torch.Tensor:
    """Input perturbation: noise the input with ``noise + gamma * n'`` but keep ``noise`` as the target.

    Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models".
    """
    if gamma == 0:
        return noise
    return noise + gamma * randn(noise.shape, generator, noise)


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) broadcastable against ``like``."""
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(
    latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (Ho et al. 2020, eq. 4)."""
    a = _expand(alphas_cumprod[timesteps.cpu()], latents)
    out = a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()
    return out.to(latents.dtype)


def target(
    prediction_type: str,
    latents: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the denoiser is trained to predict.

    ``epsilon``: the noise. ``v_prediction``: v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
    (Salimans & Ho 2022, "Progressive Distillation", sec. 4).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _expand(alphas_cumprod[timesteps.cpu()], latents)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()).to(latents.dtype)
    raise ValueError(f"unknown prediction type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) at each timestep. Shape (B,)."""
    a = alphas_cumprod[timesteps.cpu()].float()
    return a / (1 - a)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

    The paper's weight min(SNR, gamma) is for x_0 loss; for an epsilon loss it becomes min(SNR, gamma)/SNR
    and for a v loss min(SNR, gamma)/(SNR + 1).
    """
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_values
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1)
    raise ValueError(f"unknown prediction type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")


def weighted_mse(
    pred: torch.Tensor, tgt: torch.Tensor, weights: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error per sample, optionally weighted per sample, averaged over the batch.

    ``mask`` (B, 1, h, w), in [0, 1], weights each element (masked loss: white = train) and each sample's error
    is normalised by its mask's area, so a small subject counts as much as a large one; an all-black mask
    contributes nothing (and no gradient)."""
    return weighted_loss(squared_error(pred, tgt), weights, mask)


def weighted_loss(
    elementwise: torch.Tensor, weights: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """An elementwise loss (B, C, h, w) (any ``LOSS_TYPES``) reduced as ``weighted_mse`` reduces the squared
    error: per sample (over the mask's area when ``mask`` is given), times ``weights`` (B,), batch mean."""
    if mask is None:
        per_sample = elementwise.flatten(1).mean(1)  # (B,)
    else:
        mask = mask.to(elementwise)
        area = mask.expand_as(elementwise).flatten(1).sum(1)  # (B,)
        per_sample = (elementwise * mask).flatten(1).sum(1) / area.clamp_min(1e-6)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()


def dropout_mask(n: int, probability: float, generator: torch.Generator) -> list[bool]:
    """Which of ``n`` captions to drop for the empty prompt (classifier-free guidance training)."""
    if probability == 0:
        return [False] * n
    return (torch.rand(n, generator=generator) < probability).tolist()


def drop_captions(captions: Sequence[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by the empty prompt with ``probability``."""
    mask = dropout_mask(len(captions), probability, generator)
    return ["" if d else c for c, d in zip(captions, mask, strict=True)]


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale a beta schedule so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).to(betas.dtype)


def step_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (run seed, epoch, batch, rank), stable across runs."""
    return random.Random(":".join(str(p) for p in parts)).getrandbits(63)


# ---- flow matching (rectified flow; Esser et al. 2024, "Scaling Rectified Flow Transformers") -----------
FLOW_SAMPLING = ("uniform", "logit_normal", "mode")
FLOW_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


def sample_flow_sigmas(
    batch_size: int,
    generator: torch.Generator,
    scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Noise levels σ in (0, 1), one per sample, before any shift. Shape (B,).

    ``uniform``; ``logit_normal``: sigmoid of N(mean, std), which favours the middle (SD3 paper, sec. 3.1);
    ``mode``: the mode-seeking density with heavier tails, ``scale`` sets how much. Drawn from
    ``generator`` so that a resumed run draws what a straight one would.
    """
    if scheme not in FLOW_SAMPLING:
        raise ValueError(f"unknown flow sigma sampling {scheme!r}; valid: {', '.join(FLOW_SAMPLING)}")
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling(
        scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale, generator=generator
    )


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3 resolution shift ``s·σ / (1 + (s − 1)·σ)``: s > 1 spends more steps at high noise, which
    larger images need (SD3 paper, sec. 5.3.2; SD3 uses s = 3)."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


# ---- a range of flow noise levels: the whole density, truncated (inverse-CDF sampling) -------------------
# The mode density's map u = 1 − x − s·(cos²(πx/2) − 1 + x) is monotone only for −1 ≤ s ≤ 2/(π − 2)
# (SD3 paper, sec. 3.1); outside, it has no inverse CDF to truncate by.
MODE_SCALE_RANGE = (-1.0, 2 / (math.pi - 2))


def unshift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of ``shift_sigmas``: σ = s·u / (1 + (s − 1)·u) solved for u is σ / (s − (s − 1)·σ)."""
    if shift == 1.0:
        return sigmas
    return sigmas / (shift - (shift - 1) * sigmas)


def _mode_map(x: torch.Tensor, scale: float) -> torch.Tensor:
    """diffusers' ``mode`` draw: a uniform x to u. Decreasing in x, from u(0) = 1 to u(1) = 0."""
    return 1 - x - scale * (torch.cos(math.pi * x / 2) ** 2 - 1 + x)


def _check_mode_scale(scale: float) -> None:
    lo, hi = MODE_SCALE_RANGE
    if not lo <= scale <= hi:
        raise ValueError(
            f"model.mode_scale={scale}: a noise range needs the mode density's inverse CDF, which exists for "
            f"mode_scale in [{lo}, {hi:.4f}] only"
        )


def flow_sigma_cdf(
    sigmas: torch.Tensor, scheme: str, shift: float, logit_mean: float, logit_std: float, mode_scale: float
) -> torch.Tensor:
    """P(σ' ≤ σ) for σ' from ``sample_flow_sigmas`` shifted by ``shift``: the density's CDF at the
    unshifted level u (the shift is increasing, so F(σ) = F_u(u)). float64, the shape of ``sigmas``."""
    u = unshift_sigmas(sigmas.double().clamp(0, 1), shift)
    if scheme == "uniform":
        return u
    if scheme == "logit_normal":  # logit(u) ~ N(mean, std)
        return torch.special.ndtr((torch.logit(u) - logit_mean) / logit_std)
    if scheme == "mode":  # u = g(x) with g decreasing: P(g(x) ≤ u) = 1 − g⁻¹(u), g⁻¹ by bisection
        _check_mode_scale(mode_scale)
        left, right = torch.zeros_like(u), torch.ones_like(u)
        for _ in range(60):  # 2⁻⁶⁰: below float64's resolution of [0, 1]
            mid = (left + right) / 2
            right_of_mid = _mode_map(mid, mode_scale) > u
            left, right = torch.where(right_of_mid, mid, left), torch.where(right_of_mid, right, mid)
        return 1 - (left + right) / 2
    raise ValueError(f"unknown flow sigma sampling {scheme!r}; valid: {', '.join(FLOW_SAMPLING)}")


def flow_sigma_quantile(
    p: torch.Tensor, scheme: str, shift: float, logit_mean: float, logit_std: float, mode_scale: float
) -> torch.Tensor:
    """The inverse of ``flow_sigma_cdf``: the σ below which a share ``p`` of the shifted density lies."""
    p = p.double()
    if scheme == "uniform":
        u = p
    elif scheme == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(p))
    elif scheme == "mode":
        _check_mode_scale(mode_scale)
        u = _mode_map(1 - p, mode_scale)
    else:
        raise ValueError(f"unknown flow sigma sampling {scheme!r}; valid: {', '.join(FLOW_SAMPLING)}")
    return shift_sigmas(u, shift)


def sample_flow_sigmas_in(
    batch_size: int,
    generator: torch.Generator,
    lo: float,
    hi: float,
    scheme: str,
    shift: float,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Noise levels from the whole shifted density conditioned on [lo, hi]: not the density squashed
    into the range. Inverse-CDF sampling (Devroye 1986, sec. II.2): p uniform in [F(lo), F(hi)], σ = F⁻¹(p).
    One uniform per sample from ``generator`` and no rejection loop, so a draw is as reproducible as the
    whole range's. Shape (B,), float64."""
    a, b = flow_sigma_cdf(torch.tensor([lo, hi]), scheme, shift, logit_mean, logit_std, mode_scale).tolist()
    p = a + (b - a) * torch.rand(batch_size, generator=generator, dtype=torch.float64)
    return flow_sigma_quantile(p, scheme, shift, logit_mean, logit_std, mode_scale).clamp(lo, hi)


def flow_noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_σ = (1 − σ)·x0 + σ·ε``: a straight line from data (σ = 0) to noise (σ = 1). sigmas: (B,)."""
    s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return (1 - s) * latents + s * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity ``dx/dσ = ε − x0`` that a flow-matching model predicts."""
    return noise - latents


def flow_weights(sigmas: torch.Tensor, scheme: str = "none") -> torch.Tensor:
    """Per-sample loss weights: ``none`` (1), ``sigma_sqrt`` (σ⁻²) or ``cosmap``
    (2 / (π·(1 − 2σ + 2σ²)), SD3 paper, sec. 3.1). Shape (B,), float32, on ``sigmas``' device."""
    if scheme not in FLOW_WEIGHTING:
        raise ValueError(f"unknown flow loss weighting {scheme!r}; valid: {', '.join(FLOW_WEIGHTING)}")
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigmas.float())


# ---- loss types: kohya sd-scripts' --loss_type, --huber_c and --huber_schedule -------------------------
# The scheduled pseudo-Huber loss is Khrapov et al. 2024, "Improving Diffusion Models's Data-Corruption
# Resistance using Scheduled Pseudo-Huber Loss"; the definitions below are sd-scripts' (library/train_util.py:
# ``conditional_loss`` and ``get_huber_threshold_if_needed``), which is what users compare against.
LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def squared_error(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """``l2``: ``(pred − tgt)²`` elementwise, in float32."""
    return (pred.float() - tgt.float()).pow(2)


def _per_sample(c: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A threshold as a number, or (B,) -> (B, 1, ...) float32 on ``like``'s device."""
    return _expand(c, like) if isinstance(c, torch.Tensor) else float(c)


def pseudo_huber(pred: torch.Tensor, tgt: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """``huber``: the pseudo-Huber loss ``2c·(√((pred − tgt)² + c²) − c)`` elementwise, in float32; ``c`` a
    number or one per sample (B,). Like l2 where |pred − tgt| ≪ c (it tends to (pred − tgt)² as c → ∞), like
    a scaled l1 where |pred − tgt| ≫ c (≈ 2c·|pred − tgt|), so outliers pull less than under l2."""
    c = _per_sample(c, pred)
    return 2 * c * (((pred.float() - tgt.float()).pow(2) + c**2).sqrt() - c)


def smooth_l1(pred: torch.Tensor, tgt: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """``smooth_l1``: ``2·(√((pred − tgt)² + c²) − c)`` elementwise, in float32: kohya's, the pseudo-Huber loss
    over c (not torch's ``smooth_l1_loss``). ≈ (pred − tgt)²/c where |pred − tgt| ≪ c and ≈ 2·|pred − tgt|
    where |pred − tgt| ≫ c (it tends to 2·l1 as c → 0)."""
    c = _per_sample(c, pred)
    return 2 * (((pred.float() - tgt.float()).pow(2) + c**2).sqrt() - c)


def huber_threshold(c: float, schedule: str, levels: torch.Tensor, snr_values: torch.Tensor) -> torch.Tensor:
    """The Huber threshold of each sample (B,), float32. ``levels``: the noise level, t / T (DDPM) or σ (flow);
    ``snr_values``: the signal-to-noise ratio there.

    ``constant``: c. ``exponential``: ``exp(ln(c)·level)`` = c^level, from 1 at no noise to c at pure noise
    (sd-scripts: exp(−α·t), α = −ln(c)/T). ``snr``: ``(1 − c)/(1 + r)² + c`` with r = 1/√SNR the noise-to-signal
    ratio (sd-scripts: r = √((1 − ᾱ_t)/ᾱ_t)), also from 1 at no noise to c at pure noise."""
    levels = levels.float()
    if schedule == "constant":
        return torch.full_like(levels, c)
    if schedule == "exponential":
        return torch.exp(math.log(c) * levels)
    if schedule == "snr":
        r = snr_values.float().rsqrt()  # SNR 0 (pure noise) -> inf -> c; SNR inf (clean) -> 0 -> 1
        return (1 - c) / (1 + r) ** 2 + c
    raise ValueError(f"unknown Huber schedule {schedule!r}; valid: {', '.join(HUBER_SCHEDULES)}")


def flow_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """The SNR of ``x_σ = (1 − σ)·x0 + σ·ε``: ((1 − σ)/σ)². So the ``snr`` Huber threshold is (1 − c)(1 − σ)² + c
    (sd-scripts has no ``snr`` schedule for flow models: this is its DDPM formula at the same ratio)."""
    sigmas = sigmas.float()
    return ((1 - sigmas) / sigmas) ** 2


def schedule_huber_threshold(schedule: Any, timesteps: torch.Tensor, c: float, name: str) -> torch.Tensor:
    """``huber_threshold`` at a batch's timesteps of a noise schedule (models/noise.py, DDPM or flow)."""
    levels = timesteps.float() / schedule.num_timesteps  # DDPM t / T, flow σ alike
    if name != "snr":
        return huber_threshold(c, name, levels, levels)
    if schedule.kind == "ddpm":
        return huber_threshold(c, name, levels, snr(schedule.alphas_cumprod, timesteps))
    return huber_threshold(c, name, levels, flow_snr(schedule.sigmas(timesteps)))


def elementwise_loss(
    loss_type: str,
    pred: torch.Tensor,
    tgt: torch.Tensor,
    schedule: Any = None,
    timesteps: torch.Tensor | None = None,
    c: float = 0.1,
    name: str = "snr",
) -> torch.Tensor:
    """The loss of each element (B, C, h, w), float32, for ``weighted_loss`` to reduce; ``huber`` and ``smooth_l1``
    take their threshold from ``c`` scheduled by ``name`` over ``schedule``'s ``timesteps``."""
    if loss_type == "l2":
        return squared_error(pred, tgt)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    threshold = schedule_huber_threshold(schedule, timesteps, c, name)
    return (pseudo_huber if loss_type == "huber" else smooth_l1)(pred, tgt, threshold)
