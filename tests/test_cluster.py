"""Clusters through hydra-submitit-launcher: a real local sweep, preemption with a checkpoint and submitit's
requeue, and the SLURM submission the config asks for (made without a cluster)."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli, wait_for
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from safetensors.torch import load_file

QUIET = ("callbacks.validation.enabled=false", "callbacks.ema.enabled=false", "trainer.enable_progress_bar=false")


@pytest.fixture(autouse=True)
def no_hydra_config_left():
    """Tests here that set Hydra's run-time config take it away again, so later tests see a plain run."""
    from hydra.core.hydra_config import HydraConfig

    yield
    HydraConfig.instance().cfg = None


def test_a_local_submitit_sweep_runs_every_job(demo_dir, tmp_path):
    result = run_cli(
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={tmp_path}",
        f"demo_assets_dir={demo_dir}",
        "seed=1,2",
        "max_train_steps=2",
        *QUIET,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (load_file(tmp_path / job / "pytorch_lora_weights.safetensors") for job in ("0", "1"))
    assert a.keys() == b.keys() and any(not a[k].equal(b[k]) for k in a)  # two jobs, two seeds


@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_finishes(demo_dir, tmp_path):
    """USR2 (SLURM's warning before a time limit or preemption): the job finishes its step, writes a
    checkpoint, submitit requeues it (its local executor restarts the job as SLURM would), and the new
    process resumes from that checkpoint on its own, with the same command line, to the final step."""
    env = {**os.environ, "TUNER_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    env.pop("TUNER_RUN_ID", None)
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}"]
    cmd += [f"demo_assets_dir={demo_dir}", "max_train_steps=60", "checkpointing_steps=5", *QUIET]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = tmp_path / "0"
    try:
        wait_for(job / "checkpoints" / "5", proc)  # training is under way
        first = json.loads((job / ".tuner.lock").read_text())["pid"]
        os.kill(first, signal.SIGUSR2)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    log = (job / "train.log").read_text()
    assert "received SIGUSR2: finishing this step, then writing a checkpoint" in log
    assert "requeueing through submitit" in log
    resumed = [line for line in log.splitlines() if "tuner: resuming from /" in line]
    assert len(resumed) == 1, log[-2000:]  # the requeued process found the preemption checkpoint itself
    stopped_at = int(resumed[0].rsplit("/checkpoints/", 1)[1].split("/")[0])
    assert 5 <= stopped_at < 60
    assert (job / "checkpoints" / "60").is_dir() and (job / "pytorch_lora_weights.safetensors").is_file()
    tracker = json.loads((job / "checkpoints" / "60" / "tracker_state.json").read_text())
    assert tracker["global_step"] == 60


def _launcher(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    launcher["submitit_folder"] = "/scratch/sweep/.submitit/%j"
    launcher["name"] = "train"
    return launcher


def test_the_slurm_submission_is_what_the_config_asks_for(tmp_path, monkeypatch):
    from tuner.runtime.cluster import sbatch_script

    # submitit's SLURM executor looks for srun on the PATH before it writes anything (a login node has it)
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    launcher = _launcher(
        "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=8",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=240",
        "hydra.launcher.signal_delay_s=180",
        "hydra.launcher.account=vision",
    )
    launcher["tasks_per_node"] = launcher["gpus_per_node"]  # (the ${.gpus_per_node} interpolation, resolved)
    script = sbatch_script(launcher)
    for flag in (
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=240",
        "#SBATCH --signal=USR2@180",
        "#SBATCH --account=vision",
        "#SBATCH --cpus-per-task=8",
    ):
        assert flag in script, f"{flag} not in:\n{script}"
    assert "srun" in script


def test_trainer_slurm_takes_nodes_and_gpus_from_the_launcher():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "trainer=slurm",
                "hydra.launcher.nodes=2",
                "hydra.launcher.gpus_per_node=4",
            ],
            return_hydra_config=True,
        )
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert trainer["devices"] == 4 and trainer["num_nodes"] == 2
    assert trainer["plugins"][0]["auto_requeue"] is False  # submitit requeues, after tuner's checkpoint
    assert cfg.hydra.launcher.max_num_timeout > 0  # a job that hits its time limit comes back


def test_a_basic_sweep_of_multi_process_jobs_is_still_refused(demo_dir, tmp_path):
    result = run_cli(
        "train.py", "-m", "trainer=ddp", "trainer.accelerator=cpu", f"hydra.sweep.dir={tmp_path}", "seed=1,2"
    )
    assert result.returncode != 0 and "hydra/launcher=slurm" in result.stderr


@pytest.mark.parametrize(("trainer", "refused"), [("default", True), ("slurm", False)])
def test_a_slurm_job_of_many_tasks_needs_a_trainer_that_uses_them(trainer, refused, demo_dir, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    from tuner.config import ConfigError
    from tuner.run import prepare

    overrides = [f"demo_assets_dir={demo_dir}", f"output_dir={tmp_path}", "hydra/launcher=slurm", f"trainer={trainer}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "hydra.launcher.gpus_per_node=4"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    if refused:
        with pytest.raises(ConfigError, match="starts 4 tasks per job but trainer=default runs one process"):
            prepare(cfg)
    else:
        assert prepare(cfg).trainer.devices == 4
