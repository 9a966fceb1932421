"""The seed's mixture-of-experts split schedule, one expert per run: each trains (and measures its
validation loss) on its own side of model.expert_boundary, for DDPM and flow families alike."""

import math

import pytest
import torch

from tuner.config import ConfigError
from tuner.run import build_module, prepare, train


@pytest.mark.parametrize(("expert", "t_range", "levels"), [("low_noise", (0, 350), [0.1, 0.3]), ("high_noise", (350, 1000), [0.5, 0.7, 0.9])])
def test_a_ddpm_expert_trains_its_side_of_the_boundary(expert, t_range, levels, make_cfg, tmp_path):
    cfg = prepare(make_cfg(f"model.expert={expert}", "model.expert_boundary=0.35", output_dir=tmp_path))
    assert list(cfg.callbacks.validation.loss_levels) == levels  # val/loss on its own range too
    module = build_module(cfg, with_optimizer=False)
    assert (module.noise.min_t, module.noise.max_t) == t_range
    t = module.noise.sample(2000, torch.Generator().manual_seed(0))
    assert t_range[0] <= int(t.min()) and int(t.max()) < t_range[1]


def test_a_flow_expert_samples_sigmas_on_its_side(make_cfg, tmp_path):
    cfg = prepare(make_cfg("model=sd3", "model.expert=high_noise", "model.expert_boundary=0.6", output_dir=tmp_path))
    module = build_module(cfg, with_optimizer=False)
    sigmas = module.noise.sigmas(module.noise.sample(2000, torch.Generator().manual_seed(0)))
    assert float(sigmas.min()) >= 0.6 and float(sigmas.max()) <= 1.0
    assert list(cfg.callbacks.validation.loss_levels) == [0.7, 0.9]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.expert=low_noise", "model.expert_boundary=1.5"], "model.expert_boundary=1.5; valid: between 0 and 1"),
        (["model.expert=low_noise", "model.min_timestep=100"], "give the range as noise levels only"),
        (["model.expert=low_noise", "model.min_noise_level=0.5"], "leaves no noise range"),
    ],
)
def test_impossible_expert_settings_fail_before_loading(overrides, message, make_cfg):
    with pytest.raises(ConfigError) as err:
        prepare(make_cfg(*overrides, "model.pretrained_model_name_or_path=/nonexistent"))
    assert message in str(err.value)


def test_an_unknown_expert_names_the_valid_ones(make_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("model.expert=middle")
    assert "high_noise" in str(err.value.__cause__) and "low_noise" in str(err.value.__cause__)


def test_an_expert_run_end_to_end(make_cfg, tmp_path):
    loss = train(make_cfg("model.expert=high_noise", "max_train_steps=2", output_dir=tmp_path))
    assert loss is not None and math.isfinite(loss)
