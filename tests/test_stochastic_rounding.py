"""bf16 trained weights (``model.weight_dtype=bf16``) with ``optimizer.stochastic_rounding``: updates far below a
bf16 step move the weights on average, where plain bf16 rounds every one of them away; the rounding is unbiased,
and a run resumes bit-exactly (the optimiser's state stays fp32 across the checkpoint)."""

import pytest
import torch
from safetensors.torch import load_file

from models.rounding import StochasticRounding, stochastic_round
from tuner.config import ConfigError
from tuner.run import prepare, train


def _sgd_run(rounding: bool, steps: int = 200, lr: float = 1e-4) -> torch.Tensor:
    """``steps`` SGD updates of ``-lr`` on 4096 bf16 weights at 1.0, whose bf16 neighbours are 2^-8 apart below."""
    weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    optimizer = torch.optim.SGD([weight], lr=lr)
    clock = [0]  # the step being taken, as the run's global step
    sr = StochasticRounding(optimizer, lambda: (0, clock[0])) if rounding else None
    for step in range(steps):
        clock[0] = step
        weight.grad = torch.ones_like(weight)
        if sr is not None:
            sr.before_step()
        optimizer.step()
        assert weight.dtype == torch.bfloat16
    return weight.detach().float()


def test_many_tiny_updates_move_a_bf16_weight_only_with_stochastic_rounding():
    plain = _sgd_run(rounding=False)
    assert torch.equal(plain, torch.ones_like(plain)), "plain bf16 rounds each 1e-4 update away"
    rounded = _sgd_run(rounding=True)
    assert rounded.mean().item() == pytest.approx(1 - 200 * 1e-4, abs=2e-4)  # the fp32 path's 0.98, on average


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    step = 2.0**-7  # bf16's spacing in [1, 2)
    x = torch.full((200_000,), 1 + 0.3 * step)
    out = stochastic_round(x, torch.Generator().manual_seed(0)).float()
    assert set(out.unique().tolist()) == {1.0, 1 + step}
    assert out.mean().item() == pytest.approx(1 + 0.3 * step, abs=0.01 * step)
    negative = stochastic_round(-x, torch.Generator().manual_seed(0)).float()
    assert negative.mean().item() == pytest.approx(-(1 + 0.3 * step), abs=0.01 * step)
    exact = torch.randn(1000).bfloat16().float()  # already bf16: left as it is
    assert torch.equal(stochastic_round(exact, torch.Generator().manual_seed(1)).float(), exact)
    special = torch.tensor([float("inf"), float("-inf"), 0.0])
    assert torch.equal(stochastic_round(special, torch.Generator()).float(), special)


BF16 = ("model.finetune=full", "mixed_precision=bf16", "model.weight_dtype=bf16", "optimizer.lr=1e-5")


def _changed(run, base) -> float:
    """The fraction of the UNet's weights above 0.02 in size the run changed: there, a bf16 step is 2^-13 (1.2e-4)
    or more, and an AdamW update of about lr (1e-5) is under half of it."""
    trained = load_file(next((run / "pipeline" / "unet").glob("*.safetensors")))
    loaded = {k: v.bfloat16() for k, v in base.items()}  # the base as it loaded: bf16
    large = {k: v.float().abs() > 0.02 for k, v in loaded.items()}
    changed = sum(int(((trained[k] != loaded[k]) & large[k]).sum()) for k in base)
    return changed / sum(int(m.sum()) for m in large.values())


def test_a_bf16_full_fine_tune_learns_small_steps_only_with_stochastic_rounding(make_cfg, demo_dir, tmp_path):
    base = load_file(next((demo_dir / "sd15" / "unet").glob("*.safetensors")))
    train(make_cfg(*BF16, "max_train_steps=2", output_dir=tmp_path / "plain"))
    train(make_cfg(*BF16, "optimizer.stochastic_rounding=true", "max_train_steps=2", output_dir=tmp_path / "sr"))
    plain, rounded = _changed(tmp_path / "plain", base), _changed(tmp_path / "sr", base)
    assert plain == 0 and rounded > 0.03, (plain, rounded)  # about lr / step per step: 5-15 %


def test_a_stochastically_rounded_run_resumes_exactly(make_cfg, tmp_path):
    common = (*BF16, "optimizer.stochastic_rounding=true", "checkpointing_steps=2")
    train(make_cfg(*common, "max_train_steps=4", output_dir=tmp_path / "straight"))
    train(make_cfg(*common, "max_train_steps=2", output_dir=tmp_path / "resumed"))
    train(make_cfg(*common, "max_train_steps=4", "resume_from_checkpoint=latest", output_dir=tmp_path / "resumed"))
    a, b = (load_file(next((tmp_path / r / "pipeline" / "unet").glob("*.safetensors"))) for r in ("straight", "resumed"))
    assert all(v.dtype == torch.bfloat16 for v in a.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(next((tmp_path / "resumed" / "checkpoints").rglob("*.ckpt")), weights_only=False)
    moments = [s["exp_avg"] for s in state["optimizer_states"][0]["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)  # the optimiser's state stays fp32


def test_bf16_weights_and_rounding_are_checked_before_load(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="model.weight_dtype=bf16 needs mixed_precision=bf16"):
        prepare(make_cfg("model.weight_dtype=bf16", output_dir=tmp_path))
    with pytest.raises(ConfigError, match="optimizer.stochastic_rounding rounds bf16 weights"):
        prepare(make_cfg("optimizer.stochastic_rounding=true", output_dir=tmp_path))
