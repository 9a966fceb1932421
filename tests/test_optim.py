"""Optimisers and learning-rate schedules: each trains, each schedule has its documented shape, and the
schedule resumes exactly."""

import csv
import math

import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate

from tuner.run import train

OPTIMIZERS = ["adamw", "adamw8bit", "lion8bit", "lion", "stableadamw", "prodigy", "adafactor"]


def _rows(out):
    (metrics,) = out.glob("logs/*/metrics.csv")
    return list(csv.DictReader(metrics.open()))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains(name, make_cfg, tmp_path):
    lr = "1.0" if name == "prodigy" else "1e-3"
    loss = train(make_cfg(f"optimizer={name}", f"optimizer.lr={lr}", "max_train_steps=3", output_dir=tmp_path))
    assert loss is not None and math.isfinite(loss)
    rows = _rows(tmp_path)
    norms = [float(r["grad_norm"]) for r in rows if r.get("grad_norm")]
    assert len(norms) == 3 and all(math.isfinite(n) and n > 0 for n in norms)


def _factors(name: str, steps: int = 100, **overrides) -> list[float]:
    cfg = compose_cfg([f"lr_scheduler={name}", *(f"lr_scheduler.{k}={v}" for k, v in overrides.items())])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = instantiate(cfg.lr_scheduler)(optimizer, num_training_steps=steps)
    out = []
    for _ in range(steps + 1):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedule_shapes():
    approx = pytest.approx
    constant = _factors("constant_with_warmup", warmup_steps=10)
    assert (constant[0], constant[5], constant[10], constant[50], constant[100]) == approx((0, 0.5, 1, 1, 1))
    cos = _factors("cosine", warmup_steps=10)
    assert (cos[0], cos[10], cos[55], cos[100]) == approx((0, 1, 0.5, 0), abs=1e-6)
    lin = _factors("linear", warmup_steps=20)
    assert (lin[0], lin[20], lin[60], lin[100]) == approx((0, 1, 0.5, 0))
    poly = _factors("polynomial", warmup_steps=0, power=2.0, lr_end=0.0)
    assert (poly[0], poly[50], poly[100]) == approx((1, 0.25, 0), abs=1e-6)
    restarts = _factors("cosine_with_restarts", warmup_steps=0, num_cycles=2)
    assert restarts[0] == approx(1) and restarts[25] == approx(0.5, abs=1e-6) and restarts[50] == approx(1)
    sine = _factors("sine", warmup_steps=10, cycles=1, min_lr_ratio=0.2)
    # warm-up to 1, down to min_lr_ratio at mid-run, back to 1 at the end, smoothly
    assert (sine[0], sine[10], sine[55], sine[100]) == approx((0, 1, 0.2, 1), abs=1e-6)
    assert max(abs(a - b) for a, b in zip(sine[11:], sine[12:], strict=False)) < 0.05


def _lrs(out):
    by_step = {}
    for path in sorted(out.glob("logs/*/metrics.csv")):
        for r in csv.DictReader(path.open()):
            if r.get("lr"):
                by_step[int(r["step"])] = float(r["lr"])
    return by_step


def test_schedule_resumes_exactly(make_cfg, tmp_path):
    from safetensors.torch import load_file

    common = ("lr_scheduler=cosine", "lr_scheduler.warmup_steps=2", "checkpointing_steps=3", "max_train_steps=6")
    straight = tmp_path / "straight"
    train(make_cfg(*common, output_dir=straight))
    resumed = tmp_path / "resumed"
    train(make_cfg(*common, f"resume_from_checkpoint={straight / 'checkpoints' / '3'}", output_dir=resumed))
    assert {s: lr for s, lr in _lrs(straight).items() if s >= 3} == _lrs(resumed)
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_raising_max_train_steps_on_resume_follows_the_new_curve(make_cfg, tmp_path):
    common = ("lr_scheduler=cosine", "lr_scheduler.warmup_steps=2", "checkpointing_steps=3")
    out = tmp_path / "out"
    train(make_cfg(*common, "max_train_steps=3", output_dir=out))  # ends at lr 0: the end of its cosine
    train(make_cfg(*common, "max_train_steps=6", "resume_from_checkpoint=latest", output_dir=out))
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * (3 - 2) / (6 - 2)))  # the 6-step cosine at step 3
    assert _lrs(out)[3] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "name", ["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "polynomial", "linear", "sine"]
)
def test_every_schedule_trains(name, make_cfg, tmp_path):
    loss = train(
        make_cfg(f"lr_scheduler={name}", "lr_scheduler.warmup_steps=1", "max_train_steps=3", output_dir=tmp_path)
    )
    assert loss is not None and math.isfinite(loss)
    assert len(_lrs(tmp_path)) == 3
