"""The user-facing commands, each in a fresh process: the demo, a sweep, DDP and the tiny-pipeline writer."""

import csv
import json
import re

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file

from tuner.config.families import families, family_class


def test_quick_start_demo_runs_offline_from_nothing(tmp_path):
    """`python train.py` with no overrides: writes its tiny assets, trains, says where the outputs are."""
    result = run_cli(str(ROOT / "train.py"), cwd=tmp_path, env={"TUNER_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr[-3000:]
    (out,) = (tmp_path / "outputs").iterdir()
    assert f"outputs: {out}" in result.stdout
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["20", "30"]
    assert (tmp_path / "home" / "demo" / "sd15" / "model_index.json").is_file()
    tracker = json.loads((out / "checkpoints" / "30" / "tracker_state.json").read_text())
    assert tracker["global_step"] == 30 and tracker["images_seen"] == 60


@pytest.mark.slow
def test_multirun_sweep_writes_one_output_per_job(demo_dir, tmp_path):
    result = run_cli(
        "train.py",
        "-m",
        "optimizer.lr=1e-5,5e-5,1e-4",
        f"output_dir={tmp_path}",
        f"demo_assets_dir={demo_dir}",
        "max_train_steps=2",
        "trainer.enable_progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job, lr in enumerate(("1e-05", "5e-05", "0.0001")):
        job_dir = tmp_path / str(job)
        assert (job_dir / "pytorch_lora_weights.safetensors").is_file()
        assert f"optimizer.lr={lr}" in (job_dir / ".hydra" / "overrides.yaml").read_text().replace("'", "")
    assert not (tmp_path / "checkpoints").exists()  # nothing written outside the job directories
    with (tmp_path / "sweep_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2"] and all(float(r["metric"]) > 0 for r in rows)
    best = [r for r in rows if r["best"] == "True"]
    assert len(best) == 1 and float(best[0]["metric"]) == min(float(r["metric"]) for r in rows)
    from PIL import Image

    assert Image.open(tmp_path / "sweep_summary.png").size == (640, 400)


@pytest.mark.slow
def test_ddp_two_cpu_processes_rank_zero_writes(demo_dir, tmp_path):
    """Also: a NaN batch on rank 1 alone drops step 2 on both ranks, and rank 0 knows why (on_nonfinite=skip)."""
    out = tmp_path / "ddp"
    nan_on_rank_1 = ("+callbacks.extra.nan._target_=probes.NaNBatch", "+callbacks.extra.nan.steps=[2]",
                     "+callbacks.extra.nan.rank=1", "on_nonfinite=skip")
    result = run_cli(
        "train.py",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"output_dir={out}",
        f"demo_assets_dir={demo_dir}",
        "max_train_steps=3",
        "checkpointing_steps=3",
        "trainer.enable_progress_bar=false",
        *nan_on_rank_1,
        env={"PYTHONPATH": str(ROOT / "tests")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("tuner: trained to step 3") == 1  # only rank 0 exports and reports
    assert "step 2: the loss is not finite; step dropped (1 in a row" in (out / "train.log").read_text()
    names = {p.name for p in out.iterdir()}
    expected = {".hydra", "README.md", "checkpoints", "dataset_report.json", "logs", "train.log"}
    assert expected | {"pytorch_lora_weights.safetensors"} <= names
    # Only rank 0 writes: nothing with a rank in its name, no second log or report.
    assert not [n for n in names if "process_1" in n or "rank" in n], names
    assert names <= expected | {
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_ema.safetensors",
        "validation",
    }
    tracker = json.loads((out / "checkpoints" / "3" / "tracker_state.json").read_text())
    assert tracker["images_seen"] == 3 * 2 * 2  # steps x batch x ranks
    final, at_step = (
        load_file(out / "pytorch_lora_weights.safetensors"),
        load_file(out / "checkpoints" / "3" / "pytorch_lora_weights.safetensors"),
    )
    assert all(torch.equal(final[k], at_step[k]) for k in final)


@pytest.mark.parametrize("family", list(families()))
def test_tiny_writes_the_real_layout_and_loads(family, tmp_path):
    """Every family of conf/model/: its declared components, each in its subfolder, loaded back by
    diffusers' own from_pretrained into the family's pipeline class. ``python -m tuner.tiny``'s own main,
    in this process (a launch per family cost ~12 s of start-up each; the command line itself is launched by
    test_tiny_rejects_unknown_family and tests/test_learnable.py)."""
    from diffusers import DiffusionPipeline

    from tuner.tiny import main as tiny_main

    assert tiny_main([family, str(tmp_path / family)]) == 0
    root = tmp_path / family
    index = json.loads((root / "model_index.json").read_text())
    cls = family_class(family)
    expected = {*cls.components, "scheduler"}
    assert expected <= {k for k, v in index.items() if isinstance(v, list) and v[0]}
    for sub in expected:
        assert (root / sub).is_dir()
    pipe = DiffusionPipeline.from_pretrained(root)
    assert isinstance(pipe, cls.pipeline_class)
    if "CLIP" in type(pipe.tokenizer).__name__:
        assert pipe.tokenizer.model_max_length == 77
    if cls.noise_schedule == "ddpm":
        assert pipe.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    elif family in ("hidream", "wan"):  # HiDream-I1-Full and Wan ship UniPC over flow sigmas
        assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler" and pipe.scheduler.config.use_flow_sigmas
    else:
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_tiny_rejects_unknown_family(tmp_path):
    result = run_cli("-m", "tuner.tiny", "sd99", str(tmp_path))
    assert result.returncode == 2 and "sd15" in result.stderr


@pytest.mark.slow
def test_ddp_ranks_draw_disjoint_samples(tmp_path):
    """Two gloo processes over 8 uniquely captioned images, batch 1: an epoch is 4 steps per rank, and
    the two ranks' images in it never overlap."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        Image.new("RGB", (64, 64), (30 * i, 0, 0)).save(data / f"image number {i}.png")
    result = run_cli(
        "train.py",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"output_dir={tmp_path / 'out'}",
        f"data.path={data}",
        "data.batch_size=1",
        "data.caption_dropout_probability=0",
        "max_train_steps=4",
        "checkpointing_steps=0",
        "trainer.enable_progress_bar=false",
        env={"TUNER_LOG_LEVEL": "DEBUG", "TUNER_HOME": str(tmp_path / "home")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    drawn = {0: [], 1: []}
    for rank, captions in re.findall(r"rank (\d) epoch 0 batch \d+: \[(.*?)\]", result.stderr):
        drawn[int(rank)] += re.findall(r"'([^']*)'", captions)
    assert len(drawn[0]) == len(drawn[1]) == 4
    assert not set(drawn[0]) & set(drawn[1])
    assert set(drawn[0]) | set(drawn[1]) == {f"image number {i}" for i in range(8)}


def test_inspect_reports_without_training(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i, size in enumerate([(64, 64), (64, 64), (128, 64)]):
        Image.new("RGB", size).save(data / f"picture {i}.png")
    (data / "picture 0.txt").write_text("a red square\nthe same, said again")
    (data / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    result = run_cli(
        "-m",
        "tuner.inspect",
        f"data.path={data}",
        "data.resolution=64",
        "data.bucket_step=16",
        "data.caption_strategy=textfile",
        f"output_dir={tmp_path / 'out'}",
        "model.pretrained_model_name_or_path=/nonexistent",  # never loaded
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "usable 3, skipped 1" in out and "skipped, truncated JPEG (no end-of-image marker): 1" in out
    assert "64 x 64" in out and "96 x 48" in out
    assert "from file names for want of a caption file 2" in out
    assert "steps per epoch: 2 (2 batches of 2" in out
    report = json.loads((tmp_path / "out" / "dataset_report.json").read_text())
    assert len(report["usable"]) == 3 and report["skipped"][0]["path"].endswith("broken.jpg")
    assert not (tmp_path / "out" / "checkpoints").exists()
    typo = run_cli("-m", "tuner.inspect", "data.paht=x")
    assert typo.returncode == 2 and "Did you mean 'path'" in typo.stderr
