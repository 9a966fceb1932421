"""model.loss_type (l2, huber, smooth_l1) with model.huber_c and model.huber_schedule, as kohya sd-scripts
defines them: the pure functions by hand, their limits, the scheduled threshold for DDPM and flow, and the
loss a tiny module computes (l2 unchanged; huber composing with min-SNR and flow weighting)."""

import math

import pytest
import torch

from models import objectives as obj
from tuner.config import ConfigError
from tuner.run import build_module, prepare


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_each_loss_by_hand():
    pred, tgt = _t(0.0, 3.0, -1.0).view(1, 3, 1, 1), _t(0.0, -1.0, 0.5).view(1, 3, 1, 1)
    # d = 0, 4, -1.5; c = 0.75: sqrt(d^2 + c^2) = 0.75, sqrt(16.5625) = 4.0697..., sqrt(2.8125) = 1.6771...
    roots = [0.75, math.sqrt(16.5625), math.sqrt(2.8125)]
    assert obj.squared_error(pred, tgt).flatten().tolist() == [0.0, 16.0, 2.25]
    huber = [2 * 0.75 * (r - 0.75) for r in roots]
    assert obj.pseudo_huber(pred, tgt, 0.75).flatten().tolist() == pytest.approx(huber, rel=1e-6)
    assert obj.smooth_l1(pred, tgt, 0.75).flatten().tolist() == pytest.approx([2 * (r - 0.75) for r in roots], rel=1e-6)
    # a threshold per sample (B,): sample 0 at c = 1, sample 1 at c = 0.5 (d = 2 both)
    p2, t2 = torch.full((2, 1, 1, 1), 2.0), torch.zeros(2, 1, 1, 1)
    both = obj.pseudo_huber(p2, t2, _t(1.0, 0.5)).flatten().tolist()
    assert both == pytest.approx([2 * (math.sqrt(5) - 1), 1.0 * (math.sqrt(4.25) - 0.5)], rel=1e-6)
    with pytest.raises(ValueError, match="valid: l2, huber, smooth_l1"):
        obj.elementwise_loss("l1", pred, tgt)


def test_the_limits_kohya_s_definitions_have():
    d = _t(-3.0, -0.5, 0.25, 2.0).view(1, 4, 1, 1)
    zero = torch.zeros_like(d)
    # pseudo-Huber: -> l2 as c grows (relative gap ~ d^2 / 4c^2), -> 2c |d| as c -> 0 (float32: c = 30 is "large")
    assert obj.pseudo_huber(d, zero, 30.0).flatten().tolist() == pytest.approx((d**2).flatten().tolist(), rel=1e-2)
    small = obj.pseudo_huber(d, zero, 1e-4) / (2 * 1e-4)
    assert small.flatten().tolist() == pytest.approx(d.abs().flatten().tolist(), rel=1e-3)
    # smooth_l1 = pseudo-Huber / c: -> 2 |d| as c -> 0, -> d^2 / c as c grows
    assert obj.smooth_l1(d, zero, 1e-5).flatten().tolist() == pytest.approx((2 * d.abs()).flatten().tolist(), rel=1e-3)
    assert (obj.smooth_l1(d, zero, 30.0) * 30.0).flatten().tolist() == pytest.approx((d**2).flatten().tolist(), rel=1e-2)
    c = 0.3
    assert torch.allclose(obj.smooth_l1(d, zero, c) * c, obj.pseudo_huber(d, zero, c))


class _DDPM:
    kind, num_timesteps = "ddpm", 1000
    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)


class _Flow:
    kind, num_timesteps = "flow", 1000

    def sigmas(self, t):
        return t.float() / self.num_timesteps


def test_the_scheduled_threshold_by_hand():
    c = 0.1
    t = torch.tensor([0, 500, 999])
    assert obj.schedule_huber_threshold(_DDPM, t, c, "constant").tolist() == pytest.approx([c] * 3)
    # exponential: c ^ (t / T), kohya's exp(-alpha t) with alpha = -ln(c) / T
    expected = [math.exp(math.log(c) / 1000 * v) for v in (0, 500, 999)]
    assert obj.schedule_huber_threshold(_DDPM, t, c, "exponential").tolist() == pytest.approx(expected, rel=1e-6)
    # snr, DDPM: (1 - c) / (1 + sqrt((1 - a) / a))^2 + c at a = alphas_cumprod[t]
    acps = [_DDPM.alphas_cumprod[v].item() for v in (0, 500, 999)]
    expected = [(1 - c) / (1 + math.sqrt((1 - a) / a)) ** 2 + c for a in acps]
    assert obj.schedule_huber_threshold(_DDPM, t, c, "snr").tolist() == pytest.approx(expected, rel=1e-5)
    # flow: t = sigma T; exponential c ^ sigma; snr (1 - c)(1 - sigma)^2 + c, from 1 (sigma 0) to c (sigma 1)
    ft = _t(0.0, 250.0, 800.0, 1000.0)
    sig = [0.0, 0.25, 0.8, 1.0]
    assert obj.schedule_huber_threshold(_Flow(), ft, c, "exponential").tolist() == pytest.approx([c**s for s in sig], rel=1e-6)
    expected = [(1 - c) * (1 - s) ** 2 + c for s in sig]
    assert obj.schedule_huber_threshold(_Flow(), ft, c, "snr").tolist() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="valid: constant, exponential, snr"):
        obj.huber_threshold(c, "linear", t.float(), t.float())


def _module(make_cfg, tmp_path, *overrides):
    from tuner.run import build_datamodule

    cfg = prepare(make_cfg(*overrides, output_dir=tmp_path))
    module = build_module(cfg, with_optimizer=False)
    (batch,) = build_datamodule(cfg, tmp_path).fixed_batches(1)
    return module, batch


def _loss_and_parts(module, batch, monkeypatch):
    """compute_loss, and what it reduced: the elementwise loss and the per-sample weights."""
    seen = {}
    reduce = obj.weighted_loss

    def spy(elementwise, weights=None, mask=None):
        seen.update(elementwise=elementwise.detach(), weights=weights)
        return reduce(elementwise, weights, mask)

    monkeypatch.setattr(obj, "weighted_loss", spy)
    with torch.no_grad():
        loss = module.compute_loss(batch, torch.Generator().manual_seed(0))
    monkeypatch.setattr(obj, "weighted_loss", reduce)
    return loss, seen


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_l2_is_the_old_mse_and_huber_differs(family, make_cfg, tmp_path, monkeypatch):
    module, batch = _module(make_cfg, tmp_path, f"model={family}")
    assert module.hparams.loss_type == "l2"
    captured = {}
    elementwise = obj.elementwise_loss

    def keep(loss_type, pred, tgt, *args):
        captured.update(pred=pred.detach(), tgt=tgt.detach())
        return elementwise(loss_type, pred, tgt, *args)

    monkeypatch.setattr(obj, "elementwise_loss", keep)
    l2, parts = _loss_and_parts(module, batch, monkeypatch)
    # the loss as it was computed before loss types: the float32 squared error, per-sample mean, weighted, batch mean
    squared = (captured["pred"].float() - captured["tgt"].float()).pow(2)
    old = (squared.flatten(1).mean(1) * parts["weights"]).mean()
    assert torch.equal(l2, old)
    assert torch.equal(l2, obj.weighted_mse(captured["pred"], captured["tgt"], parts["weights"]))
    for loss_type in ("huber", "smooth_l1"):
        module.hparams.loss_type = loss_type
        other, _ = _loss_and_parts(module, batch, monkeypatch)
        assert torch.isfinite(other) and other != l2
    module.hparams.loss_type = "l2"
    assert torch.equal(_loss_and_parts(module, batch, monkeypatch)[0], l2)


@pytest.mark.parametrize(
    ("family", "weighting"),
    # (min-SNR weights only timesteps whose SNR is above gamma: the low-noise tenth of SD's schedule has them all)
    [("sd15", ["model.min_snr_gamma=5", "model.max_noise_level=0.1"]), ("sd3", ["model.loss_weighting=sigma_sqrt"])],
)
def test_huber_composes_with_the_per_sample_weights(family, weighting, make_cfg, tmp_path, monkeypatch):
    module, batch = _module(make_cfg, tmp_path, f"model={family}", *weighting, "model.loss_type=huber")
    assert module.hparams.loss_type == "huber" and module.hparams.huber_schedule == "snr"
    loss, parts = _loss_and_parts(module, batch, monkeypatch)
    weights = parts["weights"]
    assert not torch.allclose(weights, torch.ones_like(weights))  # the weighting is on
    per_sample = parts["elementwise"].flatten(1).mean(1)
    assert torch.isfinite(loss) and loss.item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.loss_type=huber", "model.huber_c=0"], "model.huber_c=0.0 with model.huber_schedule=snr; valid: 0 < huber_c <= 1"),
        (["model.loss_type=smooth_l1", "model.huber_c=1.5", "model.huber_schedule=exponential"], "model.huber_c=1.5"),
        (["model.loss_type=huber", "model.huber_c=-1", "model.huber_schedule=constant"], "model.huber_c=-1.0 with model.loss_type=huber; it must be > 0"),
    ],
)
def test_a_bad_huber_c_fails_before_loading(overrides, message, make_cfg, tmp_path):
    with pytest.raises(ConfigError) as err:
        prepare(make_cfg("model=sd15", *overrides, output_dir=tmp_path))
    assert message in str(err.value)


def test_a_large_constant_huber_c_is_allowed(make_cfg, tmp_path):
    cfg = prepare(make_cfg("model=sd15", "model.loss_type=huber", "model.huber_c=5", "model.huber_schedule=constant", output_dir=tmp_path))
    assert cfg.model.huber_c == 5
