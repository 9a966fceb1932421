"""EMA and validation callbacks on real tiny runs."""

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from conftest import start_train, wait_for
from PIL import Image
from safetensors.torch import load_file

from tuner.run import train

EMA_ON = ("callbacks.ema.enabled=true", "callbacks.ema.decay=0.9", "data.crop_style=center")


def test_ema_weights_are_exported_and_lag_the_live_ones(matrix_run):
    """On SD 1.5's LoRA run of the family matrix: 6 steps at lr 5e-2, EMA decay 0.9 (this test's settings)."""
    out = matrix_run("sd15", "lora").dir
    live = load_file(out / "pytorch_lora_weights.safetensors")
    ema = load_file(out / "pytorch_lora_weights_ema.safetensors")
    assert live.keys() == ema.keys()
    ups = [k for k in live if k.endswith("lora.up.weight")]  # zero at step 0, so the EMA trails towards 0
    assert sum(ema[k].abs().sum() for k in ups) < sum(live[k].abs().sum() for k in ups)
    assert (out / "checkpoints" / "6" / "pytorch_lora_weights_ema.safetensors").is_file()


def test_ema_survives_resume_exactly(matrix_run):
    """SD 1.5's LoRA run of the family matrix against its run stopped at step 4 and resumed to 6 (EMA decay 0.9)."""
    a = load_file(matrix_run("sd15", "lora").dir / "pytorch_lora_weights_ema.safetensors")
    b = load_file(matrix_run("sd15", "resumed").dir / "pytorch_lora_weights_ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


VALIDATION = (
    "callbacks.ema.enabled=false",  # the tiny preset turns EMA on; these tests look at the live weights
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


def _start(args, tmp_path):
    return start_train(args)


_wait_for = wait_for


def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(demo_dir, tmp_path):
    import signal

    from callbacks.checkpoints import list_checkpoints

    out = tmp_path / "out"
    common = [f"output_dir={out}", f"demo_assets_dir={demo_dir}", "trainer.enable_progress_bar=false"]
    proc = _start([*common, "max_train_steps=100000", "checkpointing_steps=5"], tmp_path)
    _wait_for(out / "checkpoints" / "5", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped at step" in stdout
    last = int(list_checkpoints(out / "checkpoints")[-1].name)
    assert last > 5 and f"stopped at step {last}" in stdout  # the step it was on, not the last periodic one
    resumed = _start([*common, f"max_train_steps={last + 2}", "resume_from_checkpoint=latest"], tmp_path)
    stdout, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"trained to step {last + 2}" in stdout


def test_a_killed_run_resumes_from_its_last_whole_checkpoint(demo_dir, tmp_path):
    from callbacks.checkpoints import list_checkpoints

    out = tmp_path / "out"
    common = [f"output_dir={out}", f"demo_assets_dir={demo_dir}", "trainer.enable_progress_bar=false"]
    proc = _start([*common, "max_train_steps=100000", "checkpointing_steps=3", "checkpoints_total_limit=2"], tmp_path)
    _wait_for(out / "checkpoints" / "9", proc)
    proc.kill()  # SIGKILL: no chance to clean up, possibly mid-write
    proc.communicate()
    whole = [int(p.name) for p in list_checkpoints(out / "checkpoints")]
    assert whole and len(whole) <= 2 and max(whole) >= 9
    resumed = _start([*common, f"max_train_steps={max(whole) + 1}", "resume_from_checkpoint=latest"], tmp_path)
    stdout, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"trained to step {max(whole) + 1}" in stdout


def test_tensorboard_events_hold_loss_lr_and_validation(make_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_cfg("logger=tensorboard", *VALIDATION, "max_train_steps=4", output_dir=tmp_path))
    (events,) = {p.parent for p in (tmp_path / "logs").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss_step", "lr", "val/loss"} <= scalars
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]
    assert any(tag.startswith("validation/") for tag in acc.Tags()["images"])


def test_wandb_offline_writes_a_run_under_output_dir(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(make_cfg("logger=wandb", "logger.offline=true", "max_train_steps=2", output_dir=tmp_path))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_validation_loss_on_a_held_out_split(make_cfg, tmp_path):
    from hydra.utils import instantiate

    from tuner.run import prepare

    cfg = prepare(make_cfg("data.validation_split=0.25", output_dir=tmp_path))
    dm = instantiate(cfg.data, seed=0)
    train_samples = dm.scan()
    assert len(dm.held_out) >= 1 and len(train_samples) + len(dm.held_out) == 12
    assert not {s.item.key for s in dm.held_out} & {s.item.key for s in train_samples}
    again = instantiate(cfg.data, seed=0)
    again.scan()
    assert [s.item.key for s in again.held_out] == [s.item.key for s in dm.held_out]  # stable split
    held_captions = {s.caption for s in dm.held_out}
    for batch in dm.fixed_batches(2):
        assert set(batch["captions"]) <= held_captions
    result = train(
        make_cfg(*VALIDATION, "data.validation_split=0.25", "max_train_steps=2", output_dir=tmp_path / "run")
    )
    assert result is not None and result > 0


class ModeProbe(L.Callback):
    """Records, at each training step, whether the denoiser and the text encoder are in train mode."""

    def __init__(self, path: str):
        self.path, self.modes = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes.append([pl_module.unet.training, pl_module.text_encoder.training])

    def on_fit_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps(self.modes))


def test_the_denoiser_trains_in_train_mode_from_the_first_step(make_cfg, tmp_path):
    """from_pretrained leaves models in eval mode and Lightning keeps the modes it finds: the denoiser must be in
    train mode from step 0 (LoRA dropout, HiDream's experts), not only after the first validation; frozen parts
    stay in eval (no dropout in the text encoder)."""
    modes = tmp_path / "modes.json"
    probe = ("+callbacks.extra.probe._target_=test_lifecycle.ModeProbe", f"+callbacks.extra.probe.path={modes}")
    train(make_cfg("max_train_steps=3", "callbacks.validation.every_n_steps=2", *probe, output_dir=tmp_path / "out"))
    assert json.loads(modes.read_text()) == [[True, False]] * 3
