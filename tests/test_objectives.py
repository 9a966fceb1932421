"""The objective's pure functions against values computed by hand."""

import math

import pytest
import torch

from models import objectives as obj


def _acp(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_add_noise_and_targets_by_hand():
    # a_t = 0.64: sqrt(a) = 0.8, sqrt(1 - a) = 0.6
    acp, t = _acp(0.5, 0.64), torch.tensor([1])
    x0, eps = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 1.0)
    assert obj.add_noise(x0, eps, acp, t).item() == pytest.approx(0.8 * 2 + 0.6 * 1)
    assert obj.target("epsilon", x0, eps, acp, t).item() == 1.0
    assert obj.target("v_prediction", x0, eps, acp, t).item() == pytest.approx(0.8 * 1 - 0.6 * 2)
    with pytest.raises(ValueError, match="valid: epsilon, v_prediction"):
        obj.target("sample", x0, eps, acp, t)


def test_snr_and_min_snr_weights_by_hand():
    acp, t = _acp(0.8, 0.5, 0.2), torch.tensor([0, 1, 2])
    snr = obj.snr(acp, t)
    assert snr.tolist() == pytest.approx([4.0, 1.0, 0.25])
    # gamma 2: eps weights min(snr, 2)/snr; v weights min(snr, 2)/(snr + 1)
    assert obj.min_snr_weights(snr, 2.0, "epsilon").tolist() == pytest.approx([0.5, 1.0, 1.0])
    assert obj.min_snr_weights(snr, 2.0, "v_prediction").tolist() == pytest.approx([2 / 5, 1 / 2, 0.25 / 1.25])


def test_weighted_mse_weights_each_sample():
    pred = torch.zeros(2, 1, 2, 2)
    tgt = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])  # per-sample mse: 1 and 4
    assert obj.weighted_mse(pred, tgt).item() == pytest.approx(2.5)
    assert obj.weighted_mse(pred, tgt, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 2) / 2)


def test_offset_noise_is_constant_per_channel():
    g = torch.Generator().manual_seed(0)
    noise = torch.zeros(2, 3, 4, 4)
    out = obj.offset_noise(noise, 0.1, g)
    assert out.shape == noise.shape
    per_channel = out.flatten(2)
    assert torch.all(per_channel == per_channel[..., :1])  # one value per (sample, channel)
    assert out.abs().sum() > 0
    assert obj.offset_noise(noise, 0.0, g) is noise


def test_input_perturbation_only_moves_the_input():
    g = torch.Generator().manual_seed(0)
    noise = torch.ones(4, 4, 8, 8)
    perturbed = obj.perturb_noise(noise, 0.1, g)
    assert not torch.equal(perturbed, noise)
    assert (perturbed - noise).std().item() == pytest.approx(0.1, rel=0.2)


def test_timesteps_uniform_in_range_and_seeded():
    ts = obj.sample_timesteps(1000, 1000, torch.Generator().manual_seed(1), min_timestep=100, max_timestep=200)
    assert ts.min() >= 100 and ts.max() < 200
    again = obj.sample_timesteps(1000, 1000, torch.Generator().manual_seed(1), min_timestep=100, max_timestep=200)
    assert torch.equal(ts, again)
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        obj.sample_timesteps(1, 1000, torch.Generator(), scheme="logit_normal")


def test_caption_dropout_rate_and_determinism():
    captions = ["a cat"] * 4000
    dropped = obj.drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    assert dropped.count("") / len(captions) == pytest.approx(0.1, abs=0.02)
    assert dropped == obj.drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    assert obj.drop_captions(captions, 0.0, torch.Generator()) == captions


def test_zero_terminal_snr_rescale():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    rescaled = obj.rescale_zero_terminal_snr(betas)
    acp = torch.cumprod(1 - rescaled.double(), 0)
    assert acp[-1].item() == pytest.approx(0.0, abs=1e-12)  # zero SNR at the last step
    assert acp[0].item() == pytest.approx((1 - betas[0]).item(), rel=1e-6)  # first step unchanged


def test_step_seed_is_stable_and_distinct():
    assert obj.step_seed(42, 0, 3, 0) == obj.step_seed(42, 0, 3, 0)
    assert len({obj.step_seed(42, e, b, r) for e in range(3) for b in range(3) for r in range(2)}) == 18
    assert 0 <= obj.step_seed(1) < 2**63
    assert math.isfinite(obj.step_seed(0))


# ---- flow matching, against hand-computed values ----------------------------------------------------
def test_flow_noising_and_target():
    x0, eps = torch.full((2, 1, 1, 1), 1.0), torch.full((2, 1, 1, 1), 3.0)
    sigmas = torch.tensor([0.25, 1.0])
    assert obj.flow_noisy(x0, eps, sigmas).flatten().tolist() == [0.75 * 1 + 0.25 * 3, 3.0]  # 1.5, then pure noise
    assert obj.flow_target(x0, eps).flatten().tolist() == [2.0, 2.0]  # eps - x0


def test_sd3_shift():
    sigmas = torch.tensor([0.0, 0.5, 1.0])
    assert obj.shift_sigmas(sigmas, 3.0).tolist() == [0.0, 0.75, 1.0]  # 3*0.5 / (1 + 2*0.5)
    assert obj.shift_sigmas(sigmas, 1.0) is sigmas


def test_flow_loss_weightings():
    sigmas = torch.tensor([0.5, 0.25])
    assert obj.flow_weights(sigmas, "none").tolist() == [1.0, 1.0]
    assert obj.flow_weights(sigmas, "sigma_sqrt").tolist() == [4.0, 16.0]  # sigma^-2
    cosmap = obj.flow_weights(sigmas, "cosmap")
    assert cosmap[0].item() == pytest.approx(2 / (math.pi * 0.5))  # 1 - 1 + 0.5 = 0.5
    assert cosmap[1].item() == pytest.approx(2 / (math.pi * (1 - 0.5 + 0.125)))
    with pytest.raises(ValueError, match="valid: none, sigma_sqrt, cosmap"):
        obj.flow_weights(sigmas, "snr")


def test_flow_sigma_sampling_is_drawn_from_the_generator():
    def draw(scheme):
        return obj.sample_flow_sigmas(4, torch.Generator().manual_seed(7), scheme, 0.0, 1.0, 1.29)

    g = torch.Generator().manual_seed(7)
    assert torch.equal(draw("uniform"), torch.rand(4, generator=g))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(draw("logit_normal"), torch.sigmoid(torch.normal(0.0, 1.0, (4,), generator=g)))
    u = torch.rand(4, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(draw("mode"), 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u))
    assert torch.equal(draw("logit_normal"), draw("logit_normal"))  # resume draws the same
    with pytest.raises(ValueError, match="valid: uniform, logit_normal, mode"):
        draw("beta")


def _hp(**kw):
    from types import SimpleNamespace

    base = dict(
        prediction_type=None, zero_terminal_snr=False, timestep_sampling="uniform", min_snr_gamma=None,
        min_noise_level=0.0, max_noise_level=1.0, min_timestep=None, max_timestep=None, flow_shift=None,
        loss_weighting="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
    )  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_noise_levels_are_fractions_of_either_schedule():
    from models.noise import DDPMSchedule, FlowSchedule

    ddpm_config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    ddpm = DDPMSchedule(ddpm_config, _hp(min_noise_level=0.2, max_noise_level=0.8))
    assert (ddpm.min_t, ddpm.max_t) == (200, 800)
    assert (ddpm.min_t, ddpm.max_t) == DDPMSchedule(ddpm_config, _hp(min_timestep=200, max_timestep=800))._range(_hp(min_timestep=200, max_timestep=800))
    assert ddpm.at_level(0.5, 2).tolist() == [500, 500] and ddpm.at_level(1.0, 1).tolist() == [999]
    t = ddpm.sample(1000, torch.Generator().manual_seed(0))
    assert int(t.min()) >= 200 and int(t.max()) < 800

    flow = FlowSchedule({"num_train_timesteps": 1000, "shift": 3.0}, _hp(min_noise_level=0.2, max_noise_level=0.8))
    t = flow.sample(1000, torch.Generator().manual_seed(0))
    assert 200 <= float(t.min()) and float(t.max()) <= 800
    assert flow.at_level(0.5, 1).tolist() == [500.0] and flow.sigmas(flow.at_level(0.5, 1)).tolist() == [0.5]
    with pytest.raises(ValueError, match="DDPM timesteps"):
        FlowSchedule({}, _hp(min_timestep=100))
