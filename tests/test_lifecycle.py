"""EMA and validation callbacks on real tiny runs."""

import csv

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from tuner.run import train

EMA_ON = ("callbacks.ema.enabled=true", "callbacks.ema.decay=0.9", "data.crop_style=center")


def test_ema_weights_are_exported_and_lag_the_live_ones(make_cfg, tmp_path):
    train(make_cfg(*EMA_ON, "max_train_steps=6", "optimizer.lr=5e-2", output_dir=tmp_path))
    live = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    ema = load_file(tmp_path / "pytorch_lora_weights_ema.safetensors")
    assert live.keys() == ema.keys()
    ups = [k for k in live if k.endswith("lora.up.weight")]  # zero at step 0, so the EMA trails towards 0
    assert sum(ema[k].abs().sum() for k in ups) < sum(live[k].abs().sum() for k in ups)
    assert (tmp_path / "checkpoints" / "6" / "pytorch_lora_weights_ema.safetensors").is_file()


def test_ema_survives_resume_exactly(make_cfg, tmp_path):
    common = (*EMA_ON, "checkpointing_steps=3")
    train(make_cfg(*common, "max_train_steps=6", output_dir=tmp_path / "straight"))
    train(make_cfg(*common, "max_train_steps=3", output_dir=tmp_path / "resumed"))
    train(make_cfg(*common, "max_train_steps=6", "resume_from_checkpoint=latest", output_dir=tmp_path / "resumed"))
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights_ema.safetensors")
    b = load_file(tmp_path / "resumed" / "pytorch_lora_weights_ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


VALIDATION = (
    "callbacks.validation.enabled=true",
    "callbacks.validation.every_n_steps=2",
    "callbacks.validation.prompts=[a red circle on white,a blue square on white]",
    "callbacks.validation.num_inference_steps=3",
    "callbacks.validation.resolution=64",
    "callbacks.validation.loss_batches=2",
    "data.crop_style=center",
)


def test_validation_images_grid_and_loss(make_cfg, tmp_path):
    result = train(make_cfg(*VALIDATION, "max_train_steps=4", output_dir=tmp_path / "a"))
    for step in (2, 4):
        folder = tmp_path / "a" / "validation" / f"step_{step}"
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["a_blue_square_on_white.png", "a_red_circle_on_white.png", "grid.png"]
        assert Image.open(folder / "grid.png").size == (128, 64)
    (metrics,) = (tmp_path / "a").glob("logs/*/metrics.csv")
    val = [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(metrics.open()) if r.get("val/loss")]
    assert [s for s, _ in val] == [2, 4] and result == val[-1][1]  # train() returns the final val/loss

    # Fixed prompts, seeds, noise and batches: a second identical run gives the same images and losses.
    train(make_cfg(*VALIDATION, "max_train_steps=4", output_dir=tmp_path / "b"))
    same = np.asarray(Image.open(tmp_path / "b" / "validation" / "step_4" / "a_red_circle_on_white.png"))
    first = np.asarray(Image.open(tmp_path / "a" / "validation" / "step_4" / "a_red_circle_on_white.png"))
    assert np.array_equal(same, first)
    (metrics_b,) = (tmp_path / "b").glob("logs/*/metrics.csv")
    val_b = [float(r["val/loss"]) for r in csv.DictReader(metrics_b.open()) if r.get("val/loss")]
    assert val_b == [v for _, v in val]


def test_validation_with_ema_samples_both(make_cfg, tmp_path):
    train(make_cfg(*VALIDATION, *EMA_ON, "max_train_steps=2", output_dir=tmp_path))
    names = sorted(p.name for p in (tmp_path / "validation" / "step_2").iterdir())
    assert "a_red_circle_on_white_ema.png" in names and "a_red_circle_on_white.png" in names
