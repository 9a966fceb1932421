"""A range of noise levels (an expert's side of the boundary, or min/max_noise_level) is the run's whole
timestep density restricted to that range: the same density, truncated, never squashed into it."""

from types import SimpleNamespace

import pytest
import torch

from models.noise import DDPMSchedule, FlowSchedule

N = 200_000
DDPM_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _hp(**kw):
    base = dict(
        prediction_type=None, zero_terminal_snr=False, timestep_sampling="uniform", min_snr_gamma=None,
        min_noise_level=0.0, max_noise_level=1.0, min_timestep=None, max_timestep=None, flow_shift=3.0,
        loss_weighting="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, expert=None, expert_boundary=0.6,
    )  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def _max_cdf_gap(a: torch.Tensor, b: torch.Tensor, lo: float, hi: float) -> float:
    """The largest gap between two samples' empirical CDFs over a fine grid of [lo, hi] (a KS statistic)."""
    grid = torch.linspace(lo, hi, 2001, dtype=torch.float64)
    a, b = a.double().sort().values, b.double().sort().values
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def _ks_bound(n: int, m: int) -> float:
    # two-sample KS at alpha ~1e-6: c(alpha) = sqrt(-ln(alpha / 2) / 2) ~ 2.7
    return 2.7 * ((n + m) / (n * m)) ** 0.5


RANGES = [
    {"expert": "low_noise"},  # [0, 0.6)
    {"expert": "high_noise"},  # [0.6, 1]
    {"min_noise_level": 0.2, "max_noise_level": 0.7},
]


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
@pytest.mark.parametrize("keys", RANGES, ids=["low_noise", "high_noise", "min_max"])
@pytest.mark.parametrize("batch_shift", [None, 1.6], ids=["config_shift", "batch_shift"])
def test_a_flow_range_is_the_shifted_density_truncated(scheme, keys, batch_shift):
    config = {"num_train_timesteps": 1000}
    ranged = FlowSchedule(config, _hp(timestep_sampling=scheme, **keys))
    whole = FlowSchedule(config, _hp(timestep_sampling=scheme))
    lo, hi = ranged.lo, ranged.hi
    inside = ranged.sigmas(ranged.sample(N, torch.Generator().manual_seed(1), batch_shift))
    assert float(inside.min()) >= lo and float(inside.max()) <= hi
    # the reference: the whole schedule (at the same shift), conditioned on falling in [lo, hi)
    full = whole.sigmas(whole.sample(4 * N, torch.Generator().manual_seed(2), batch_shift))
    conditioned = full[(full >= lo) & (full < hi)]
    assert _max_cdf_gap(inside, conditioned, lo, hi) < _ks_bound(len(inside), len(conditioned))


def test_a_ddpm_range_is_the_uniform_density_truncated():
    ranged = DDPMSchedule(DDPM_CONFIG, _hp(min_timestep=200, max_timestep=800))
    whole = DDPMSchedule(DDPM_CONFIG, _hp())
    inside = ranged.sample(N, torch.Generator().manual_seed(1))
    assert int(inside.min()) == 200 and int(inside.max()) == 799
    full = whole.sample(2 * N, torch.Generator().manual_seed(2))
    conditioned = full[(full >= 200) & (full < 800)]
    assert _max_cdf_gap(inside, conditioned, 200, 800) < _ks_bound(len(inside), len(conditioned))


def test_the_mass_below_a_level_is_the_truncated_densitys():
    """What share of a ranged schedule's draws fall below a level, at the config's shift or a batch's."""
    ranged = FlowSchedule({"num_train_timesteps": 1000}, _hp(timestep_sampling="logit_normal", min_noise_level=0.2))
    for shift in (None, 1.6):
        draws = ranged.sigmas(ranged.sample(N, torch.Generator().manual_seed(3), shift))
        assert abs(ranged.mass_below(0.6, shift) - float((draws < 0.6).double().mean())) < 0.005
    assert ranged.mass_below(0.6, 1.6) - ranged.mass_below(0.6, None) > 0.1  # less shift: more low noise
    assert ranged.mass_below(0.1, None) == 0.0 and ranged.mass_below(1.0, None) == 1.0
    ddpm = DDPMSchedule(DDPM_CONFIG, _hp(min_timestep=200, max_timestep=800))
    assert ddpm.mass_below(0.35, None) == pytest.approx(150 / 600)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_ranged_draws_come_from_the_generator_alone(scheme):
    ranged = FlowSchedule({"num_train_timesteps": 1000}, _hp(timestep_sampling=scheme, expert="high_noise"))
    torch.manual_seed(0)
    a = ranged.sample(64, torch.Generator().manual_seed(5), 2.0)
    torch.manual_seed(1)  # the global generator plays no part: a resume draws what a straight run did
    torch.rand(10)
    b = ranged.sample(64, torch.Generator().manual_seed(5), 2.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, ranged.sample(64, torch.Generator().manual_seed(6), 2.0))


def test_a_mode_scale_whose_density_cannot_be_truncated_is_refused():
    # 1 - u - s(cos^2(pi u / 2) - 1 + u) is monotone only for -1 <= s <= 2 / (pi - 2) (SD3 paper, sec. 3.1)
    with pytest.raises(ValueError, match="mode_scale"):
        FlowSchedule({}, _hp(timestep_sampling="mode", mode_scale=2.0, expert="low_noise"))
