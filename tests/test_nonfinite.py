"""A non-finite loss or gradient never reaches the weights, and non-finite weights are never saved (models/guard.py,
``on_nonfinite``): a real divergence stops the run with one line, ``skip`` drops a corrupt batch's step and trains
on, and a checkpoint or export of NaN weights is refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from callbacks.checkpoints import CheckpointError, list_checkpoints, resolve_checkpoint
from models.guard import NonFiniteError
from tuner.run import train, user_error

LORA_FILE = "pytorch_lora_weights.safetensors"
STEPWISE = ("checkpointing_steps=1", "checkpoints_total_limit=null", "callbacks.validation.enabled=false")


def _weights(run, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / str(step) / LORA_FILE))


def _steps(run) -> list[int]:
    return [int(p.name) for p in list_checkpoints(run / "checkpoints")]


def test_a_diverging_run_stops_at_its_first_nonfinite_step_and_saves_nothing_after_it(make_cfg, tmp_path):
    # lr=1e30 takes the weights to ~1e30 in one step, and the next forward pass overflows float32: a real divergence
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as caught:
        train(make_cfg("optimizer.lr=1e30", "max_train_steps=5", *STEPWISE, output_dir=run))
    message = str(user_error(caught.value))
    assert "step 2: the loss is not finite" in message and "\n" not in message
    assert "optimizer.lr" in message and "on_nonfinite=skip" in message
    assert _steps(run) == [1]  # the step before it, and nothing after
    assert resolve_checkpoint("latest", run / "checkpoints").endswith("1/checkpoint.ckpt")
    assert all(torch.isfinite(t).all() for t in _weights(run, 1).values())
    assert not (run / LORA_FILE).exists()  # no export


def test_skip_drops_a_nan_batchs_step_and_trains_on(make_cfg, tmp_path):
    run = tmp_path / "run"
    nan_batch = ("+callbacks.extra.nan._target_=probes.NaNBatch", "+callbacks.extra.nan.steps=[3]")
    train(make_cfg("on_nonfinite=skip", "max_train_steps=5", *nan_batch, *STEPWISE, output_dir=run))
    assert "step 3: the loss is not finite; step dropped (1 in a row, 1 in all" in (run / "train.log").read_text()
    assert _steps(run) == [1, 2, 3, 4, 5]
    before, dropped, after = _weights(run, 2), _weights(run, 3), _weights(run, 4)
    assert all(torch.equal(before[k], dropped[k]) for k in before)  # the dropped step changed no weight
    assert any(not torch.equal(dropped[k], after[k]) for k in before)  # the next one trains again
    state = [
        torch.load(run / "checkpoints" / str(s) / "checkpoint.ckpt", weights_only=False)["optimizer_states"][0]["state"]
        for s in (2, 3)
    ]
    assert all(torch.equal(state[0][i]["exp_avg"], state[1][i]["exp_avg"]) for i in state[0])  # nor the optimiser
    final = load_file(str(run / LORA_FILE))
    assert all(torch.isfinite(t).all() for t in final.values())


def test_skip_stops_after_max_nonfinite_skips_in_a_row(make_cfg):
    cfg = make_cfg("optimizer.lr=1e30", "on_nonfinite=skip", "max_nonfinite_skips=2", "max_train_steps=6", *STEPWISE)
    with pytest.raises(NonFiniteError, match="step 3: 2 steps in a row were dropped .*max_nonfinite_skips=2"):
        train(cfg)


def test_nonfinite_weights_are_never_checkpointed_or_exported(make_cfg, tmp_path):
    run = tmp_path / "run"
    poison = ("+callbacks.extra.poison._target_=probes.PoisonWeights", "+callbacks.extra.poison.step=2")
    with pytest.raises(CheckpointError, match="checkpoint 2 not written: 1 trainable tensors hold NaN"):
        train(make_cfg("max_train_steps=4", *poison, *STEPWISE, output_dir=run))
    assert _steps(run) == [1]
    assert not (run / LORA_FILE).exists()


def test_max_nonfinite_skips_below_one_is_a_config_error(make_cfg):
    from tuner.config import ConfigError
    from tuner.run import prepare

    with pytest.raises(ConfigError, match="max_nonfinite_skips=0; it must be >= 1"):
        prepare(make_cfg("max_nonfinite_skips=0"))
