"""One run per output directory, and user mistakes as one-line errors before anything loads.

The lock tests use real processes; the disk-full test a real, small tmpfs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import ROOT, run_cli, start_train, wait_for

from callbacks.checkpoints import CheckpointError, list_checkpoints, resolve_checkpoint
from datamodules import EmptyDatasetError
from tuner.config import ConfigError, check
from tuner.run import prepare, resume_checkpoint, train
from tuner.runtime.lock import LOCK_NAME, OutputDirLocked, RunLock


def _start(args: list[str], cwd) -> subprocess.Popen:
    return start_train(args, cwd)


_wait_for = wait_for


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tuner: error:")]


# ---- 1. one run per output directory ------------------------------------------------------------
@pytest.mark.slow
def test_a_second_run_into_a_live_runs_output_dir_is_refused_at_once(demo_dir, tmp_path):
    out = tmp_path / "out"
    common = [f"output_dir={out}", f"demo_assets_dir={demo_dir}", "trainer.enable_progress_bar=false"]
    first = _start([*common, "max_train_steps=100000", "checkpointing_steps=5"], tmp_path)
    _wait_for(out / "checkpoints" / "5", first)
    holder = json.loads((out / LOCK_NAME).read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

    started = time.monotonic()
    second = run_cli(str(ROOT / "train.py"), *common, "max_train_steps=3", cwd=tmp_path)
    assert time.monotonic() - started < 60  # refused before any model or data work, not after a run
    assert second.returncode == 2
    (line,) = _error_lines(second.stderr)
    assert f"output_dir {out} is in use by another run (pid {first.pid} on host" in line
    assert "Traceback" not in second.stderr

    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-3000:]
    # The live run was left alone: its checkpoints are whole and its own, nothing was set aside.
    steps = [int(p.name) for p in list_checkpoints(out / "checkpoints")]
    assert steps and f"stopped at step {steps[-1]}" in stdout
    assert not [p for p in (out / "checkpoints").iterdir() if not p.name.isdigit()]
    assert not (out / LOCK_NAME).exists()  # released on the way out


def _hold_lock_in_a_child(directory) -> subprocess.Popen:
    code = (
        "import sys, time\n"
        "from tuner.runtime.lock import RunLock\n"
        f"RunLock({str(directory)!r}).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_lock_is_held_while_its_process_lives_and_taken_over_after_kill_9(tmp_path):
    child = _hold_lock_in_a_child(tmp_path)
    try:
        with pytest.raises(OutputDirLocked, match=f"pid {child.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        child.kill()  # SIGKILL: the lock file stays behind, the kernel drops the flock
        child.wait()
    assert (tmp_path / LOCK_NAME).exists()
    lock = RunLock(tmp_path).acquire()
    try:
        assert lock.stale and f"pid {child.pid}" in lock.stale
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_written_on_another_host_is_refused_with_the_command_to_clear_it(tmp_path):
    record = {"host": "node-17", "pid": 4242, "started_at": time.time() - 3600}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(OutputDirLocked) as err:
        RunLock(tmp_path).acquire()
    message = str(err.value)
    assert "pid 4242 on host node-17" in message and f"rm {tmp_path / LOCK_NAME}" in message
    assert "\n" not in message
    (tmp_path / LOCK_NAME).unlink()  # what the message says to do, once that job is known to be gone
    RunLock(tmp_path).acquire().release()


def test_a_killed_runs_lock_is_taken_over_by_its_resume(demo_dir, tmp_path):
    out = tmp_path / "out"
    common = [f"output_dir={out}", f"demo_assets_dir={demo_dir}", "trainer.enable_progress_bar=false"]
    proc = _start([*common, "max_train_steps=100000", "checkpointing_steps=3"], tmp_path)
    _wait_for(out / "checkpoints" / "3", proc)
    proc.kill()
    proc.communicate()
    assert (out / LOCK_NAME).exists()
    resumed = run_cli(str(ROOT / "train.py"), *common, "max_train_steps=4", "resume_from_checkpoint=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"took over the output_dir lock of a run that ended without releasing it (pid {proc.pid}" in (
        out / "train.log"
    ).read_text()


# ---- 2. user errors: one line, before anything loads ---------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=-1", "optimizer.lr=-1.0; it must be above 0"),
        ("optimizer.lr=0", "optimizer.lr=0.0; it must be above 0"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1; valid: 0 to 1"),
        ("optimizer.weight_decay=2", "optimizer.weight_decay=2.0; valid: 0 to 1"),
        ("optimizer.betas=[0.9,1.5]", "optimizer.betas=[0.9, 1.5]"),
        ("lr_scheduler.warmup_steps=50", "lr_scheduler.warmup_steps=50 is more than max_train_steps=4"),
        ("lr_scheduler.warmup_steps=-1", "lr_scheduler.warmup_steps=-1; it must be >= 0"),
        ("max_train_steps=-5", "max_train_steps=-5; it must be a positive number"),
        ("num_train_epochs=-1", "num_train_epochs=-1; it must be a positive number"),
        ("data.resolution=5000", "data.resolution=5000 (area) makes 25-megapixel buckets"),
        ("+data.datasets.big.resolution=6000", "data.datasets.big.resolution=6000"),
    ],
)
def test_impossible_numbers_are_config_errors(override, message, make_cfg):
    cfg = make_cfg(override)  # on top of max_train_steps=4
    with pytest.raises(ConfigError) as err:
        check(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_large_buckets_pass_once_confirmed(make_cfg):
    check(make_cfg("data.resolution=5000", "data.allow_large_buckets=true"))
    check(make_cfg("data.resolution=4", "data.resolution_type=area"))  # 4 megapixels is fine


def test_a_bad_number_fails_in_one_line_before_anything_loads(demo_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli(str(ROOT / "train.py"), f"output_dir={out}", f"demo_assets_dir={demo_dir}", "optimizer.lr=-1")
    assert result.returncode == 2
    assert _error_lines(result.stderr) == ["tuner: error: optimizer.lr=-1.0; it must be above 0 (e.g. 1e-4)"]
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())  # nothing was written, not even the log (Hydra makes the folder)


def test_resuming_a_truncated_checkpoint_names_the_intact_ones(make_cfg, demo_dir, tmp_path):
    out = tmp_path / "out"
    train(make_cfg("max_train_steps=4", "checkpointing_steps=2", output_dir=out))
    damaged = out / "checkpoints" / "4" / "checkpoint.ckpt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is damaged .*intact checkpoints in .*: 2 "):
        resolve_checkpoint(str(damaged), out / "checkpoints")
    assert resolve_checkpoint("latest", out / "checkpoints").endswith("2/checkpoint.ckpt")

    result = run_cli(
        str(ROOT / "train.py"),
        f"output_dir={out}",
        f"demo_assets_dir={demo_dir}",
        "max_train_steps=6",
        f"resume_from_checkpoint={damaged}",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = _error_lines(result.stderr)
    assert "is damaged (truncated or half-written); intact checkpoints in" in line
    assert "resume_from_checkpoint=latest takes 2" in line
    assert "max_train_steps: 4" in (out / ".hydra" / "config.yaml").read_text()  # not the refused start's 6


def test_a_base_model_that_is_not_there_is_one_line_and_leaves_the_runs_record(make_cfg, tmp_path, monkeypatch):
    """A missing folder, a folder that is no pipeline, and a Hub id that cannot be fetched: the loader's own
    error was several lines about the Hub, and the refused start had already rewritten .hydra/."""
    from huggingface_hub import constants

    out = tmp_path / "out"
    train(make_cfg("max_train_steps=2", output_dir=out))
    record = {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()}
    key = "model.pretrained_model_name_or_path"
    for path, message in (
        (tmp_path / "nowhere", f"{key}={tmp_path / 'nowhere'}: no such folder"),
        (tmp_path, f"{key}={tmp_path} is a folder but not a diffusers pipeline (it has no model_index.json)"),
    ):
        with pytest.raises(ConfigError) as err:
            train(make_cfg(f"{key}={path}", "max_train_steps=3", output_dir=out))
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network in tests (a retried lookup took 23 s)
    with pytest.raises(ConfigError) as err:
        train(make_cfg(f"{key}=nobody/no-such-model", "max_train_steps=3", output_dir=out))
    assert str(err.value).startswith(f"{key}=nobody/no-such-model: could not load it from the Hugging Face Hub at "
                                      f"{constants.ENDPOINT} (HF_HUB_OFFLINE is set)") and "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()} == record


def test_resuming_another_familys_checkpoint_says_what_differs_before_loading(make_cfg, tmp_path):
    out = tmp_path / "out"
    train(make_cfg("max_train_steps=2", "checkpointing_steps=2", output_dir=out))
    for overrides, expected in (
        (["model=sdxl"], "family: checkpoint 'sd15', this run 'sdxl'"),
        (["model.lora.rank=8"], "lora_rank: checkpoint 4, this run 8"),
        (["model.lora.target_modules=[to_q,to_v,proj_in]"], "lora_target_modules: checkpoint"),
        (["model.finetune=full"], "finetune: checkpoint 'lora', this run 'full'"),
        (["model.expert=low_noise"], "expert: checkpoint None, this run 'low_noise'"),
    ):
        cfg = prepare(make_cfg(*overrides, "resume_from_checkpoint=latest", output_dir=out))
        with pytest.raises(CheckpointError, match="trained with another model setup") as err:
            resume_checkpoint(cfg, out)
        assert expected in str(err.value), str(err.value)
    # The same check reads the record inside a .ckpt that was moved away from its tracker_state.json.
    lone = tmp_path / "lone.ckpt"
    lone.write_bytes((out / "checkpoints" / "2" / "checkpoint.ckpt").read_bytes())
    cfg = prepare(make_cfg("model=sdxl", f"resume_from_checkpoint={lone}", output_dir=tmp_path / "other"))
    with pytest.raises(CheckpointError, match="family: checkpoint 'sd15', this run 'sdxl'"):
        resume_checkpoint(cfg, tmp_path / "other")


@pytest.fixture
def small_disk(tmp_path):
    """A real 900 KB filesystem (tmpfs), where a tiny run's second checkpoint does not fit."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mount)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:  # not root: no way to make a full disk for real
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial(demo_dir, small_disk, tmp_path):
    out = small_disk / "run"
    # with the progress bar on, its stdout and the error's stderr in one stream, as a terminal shows them:
    # the error was printed on the bar's open line, and train.log did not have it
    argv = [str(ROOT / "train.py"), f"output_dir={out}", f"demo_assets_dir={demo_dir}", "max_train_steps=100",
            "checkpointing_steps=2", "trainer.enable_progress_bar=true", "logger=none"]
    env = {**os.environ, "TUNER_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    env.pop("TUNER_RUN_ID", None)
    result = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "Traceback" not in result.stdout and "Logging error" not in result.stdout
    (line,) = [part for part in result.stdout.split("\n") if "tuner: error:" in part]
    assert line.startswith("tuner: error:"), repr(line)  # on a line of its own, not after the bar's "\r..."
    assert line in (out / "train.log").read_text()
    print(line)
    whole = list_checkpoints(out / "checkpoints")
    assert whole, "the first checkpoint should fit"
    step = int(whole[-1].name) + 2
    assert line.startswith(f"tuner: error: disk full: could not write checkpoint {step} to {out / 'checkpoints'}")
    assert f"the last whole checkpoint is {whole[-1]}" in line and ("KB free" in line or " B free" in line)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [p.name for p in whole]  # no .tmp-N left
    assert resolve_checkpoint("latest", out / "checkpoints") == str(whole[-1] / "checkpoint.ckpt")
    assert not (out / LOCK_NAME).exists()


# ---- 2. data mistakes ---------------------------------------------------------------------------
def _shard(path, n: int = 2) -> None:
    import io

    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (i * 40, 90, 200)).save(buf, format="PNG")
            for name, data in ((f"{i:04d}.png", buf.getvalue()), (f"{i:04d}.txt", b"a blue square")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_folder_of_shards_with_an_index_beside_them_is_webdataset(tmp_path):
    from datamodules.sources import infer_type

    _shard(tmp_path / "shard-000.tar")
    _shard(tmp_path / "shard-001.tar")
    (tmp_path / "README.md").write_text("my shards")
    (tmp_path / "index.json").write_text("{}")
    assert infer_type(str(tmp_path)) == "webdataset"
    (tmp_path / "cover.jpg").write_bytes(b"")  # an image beside them: a folder of images after all
    assert infer_type(str(tmp_path)) == "folder"


def test_no_usable_images_beside_shards_names_them(make_cfg, tmp_path):
    from datamodules import EmptyDatasetError

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)  # a sub-folder keeps it a folder of images
    _shard(data / "shard-000.tar")
    cfg = make_cfg(f"data.path={data}")
    with pytest.raises(EmptyDatasetError, match=r"holds 1 \.tar shard\(s\) \(shard-000\.tar\): .*data\.type=webdataset"):
        train(cfg)


def test_buckets_far_above_the_images_are_refused_before_load_unless_allowed(make_cfg, tmp_path, caplog):
    from hydra.utils import instantiate

    # (train() takes over the logging handlers, so the warnings are checked first)
    cfg = prepare(make_cfg("data.resolution=7", "data.allow_upscale=true"))
    with caplog.at_level("WARNING"):
        instantiate(cfg.data, seed=0, cache_dir=None).scan()  # confirmed: a warning only
    assert "the buckets enlarge the median image" in caplog.text and "check data.resolution=7" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        instantiate(prepare(make_cfg("data.resolution=256", "data.resolution_type=pixel")).data, seed=0, cache_dir=None).scan()
    assert re.search(r"enlarge the median image [23]\.\dx", caplog.text)  # between 2x and 4x: warned, not refused
    caplog.clear()
    with caplog.at_level("WARNING"):
        instantiate(prepare(make_cfg("data.resolution=64")).data, seed=0, cache_dir=None).scan()
    assert "enlarge" not in caplog.text

    # resolution=7 with resolution_type=area is 7 megapixels: 3344x2096 buckets for 128x80 px images (26x)
    run = tmp_path / "run"
    with pytest.raises(EmptyDatasetError) as caught:
        train(make_cfg("data.resolution=7", output_dir=run))
    message = str(caught.value)
    assert "enlarge the median image 26.2x" in message and "\n" not in message
    assert "resolution_type=pixel" in message and "data.allow_upscale=true" in message
    assert not (run / "checkpoints").exists()  # refused at the scan, before the model loaded


# ---- 4. smaller things ------------------------------------------------------------------------------
def test_a_failed_preflight_leaves_an_earlier_runs_files_alone(make_cfg, tmp_path):
    from datamodules import EmptyDatasetError

    out = tmp_path / "out"
    train(make_cfg("max_train_steps=2", output_dir=out))
    before = {name: (out / name).read_bytes() for name in ("dataset_report.json", ".hydra/config.yaml")}
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EmptyDatasetError, match="dataset_report.failed.json"):
        train(make_cfg(f"data.path={empty}", "optimizer.lr=3e-4", output_dir=out))
    assert {name: (out / name).read_bytes() for name in before} == before
    failed = json.loads((out / "dataset_report.failed.json").read_text())
    assert [s["path"] for s in failed["skipped"]] == [str(empty / "broken.png")]


def test_exported_weights_are_readable_by_others_as_the_umask_allows(make_cfg, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        train(make_cfg("max_train_steps=2", "checkpointing_steps=2", output_dir=out))
    finally:
        os.umask(old)
    files = list(out.rglob("*.safetensors"))
    assert len(files) >= 2
    for file in files:
        assert file.stat().st_mode & 0o777 == 0o644, file


def test_images_seen_counts_what_was_drawn_across_a_batch_size_change(make_cfg, tmp_path):
    out = tmp_path / "out"
    train(make_cfg("max_train_steps=4", "checkpointing_steps=4", "data.batch_size=2", output_dir=out))
    train(make_cfg("max_train_steps=6", "data.batch_size=1", "resume_from_checkpoint=latest", output_dir=out))
    tracker = json.loads((out / "checkpoints" / "6" / "tracker_state.json").read_text())
    assert tracker["images_seen"] == 4 * 2 + 2 * 1


def _logged_lrs(run) -> dict[int, float]:
    import csv

    lrs = {}
    for path in sorted(run.glob("logs/version_*/metrics.csv")):  # the resumed run logs to the next version
        with open(path) as f:
            lrs.update({int(r["step"]): float(r["lr"]) for r in csv.DictReader(f) if r.get("lr")})
    return lrs


def test_a_resume_applies_the_configs_optimizer_settings(make_cfg, tmp_path):
    """optimizer.lr lowered on resume was overwritten by the checkpoint's optimiser state without a word,
    while .hydra/overrides.yaml recorded the new one."""
    import torch

    out = tmp_path / "out"
    common = ("logger=csv", "checkpointing_steps=2", "lr_scheduler=constant")
    train(make_cfg(*common, "optimizer.lr=1e-3", "max_train_steps=2", output_dir=out))
    train(make_cfg(*common, "optimizer.lr=2.5e-4", "optimizer.weight_decay=0.05", "max_train_steps=4",
                   "resume_from_checkpoint=latest", output_dir=out))
    lrs = _logged_lrs(out)
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(2.5e-4)
    saved = torch.load(out / "checkpoints" / "4" / "checkpoint.ckpt", map_location="cpu", weights_only=False)
    (group,) = saved["optimizer_states"][0]["param_groups"]
    assert group["lr"] == pytest.approx(2.5e-4) and group["weight_decay"] == 0.05
    said = [line for line in (out / "train.log").read_text().splitlines() if "resume: optimizer." in line]
    assert any("optimizer.lr is 0.00025 in this run's config (0.001 in the checkpoint)" in m for m in said), said
    assert any("optimizer.weight_decay is 0.05" in m for m in said), said
    with pytest.raises(CheckpointError, match="the checkpoint's optimiser is AdamW, this run's Lion"):
        train(make_cfg(*common, "optimizer=lion", "max_train_steps=6", "resume_from_checkpoint=latest",
                       output_dir=out))
