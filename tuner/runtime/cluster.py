"""Clusters: SLURM through hydra-submitit-launcher, preemption and requeue.

SLURM warns a job before its time limit or a preemption with a signal (``--signal=USR2@<delay>``, which
the submitit launcher sets from ``signal_delay_s``). tuner then:

1. finishes the current optimiser step and writes a checkpoint, exactly as a periodic one
   (callbacks/checkpoints.py ``StepCheckpoint``, which catches the signal);
2. requeues the job through **submitit's own requeue**: the handler submitit installed for that signal
   is called only now, after the checkpoint, and resubmits the same Hydra job (same overrides, same
   output folder). Lightning's auto-requeue is off (``trainer=slurm``): it saves its own checkpoint from
   inside the signal handler, mid-step and outside tuner's checkpoint layout. A job started by plain
   ``sbatch``/``srun`` without submitit is requeued with ``scontrol requeue``;
3. the requeued job resumes from ``latest`` on its own (``auto_resume``), with no change to the command.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from callbacks.preemption import PREEMPT_SIGNAL  # noqa: F401 - the signal a job gets before its time limit

log = logging.getLogger(__name__)


def under_submitit() -> bool:
    """A job started by a submitit launcher (on SLURM or the local one)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def requeued() -> bool:
    """A SLURM job started again after a requeue (SLURM counts the restarts)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def auto_resume(spec: str | None) -> str | None:
    """``resume_from_checkpoint`` for this start: as given, or ``latest`` for a job that a cluster may have
    requeued (any submitit job, a restarted SLURM job), so that it carries on where it stopped."""
    if spec is None and (under_submitit() or requeued()):
        log.info("a cluster job: resuming from its latest checkpoint, if it has one")
        return "latest"
    return spec


def requeue(signum: int, previous: Callable | int | None) -> None:
    """After the preemption checkpoint: hand over to submitit's requeue (``previous``, its handler of the
    signal; it exits the process), else ``scontrol requeue`` this SLURM job (rank 0), else nothing."""
    if callable(previous):
        log.warning("requeueing through submitit")
        previous(signum, None)
        return
    job = os.environ.get("SLURM_JOB_ID")
    if job and int(os.environ.get("SLURM_PROCID", "0")) == 0 and shutil.which("scontrol"):
        log.warning("requeueing SLURM job %s", job)
        subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)


def is_submitit_launcher() -> bool:
    """Whether the running Hydra multirun uses a submitit launcher (each job its own process group)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    target = str(HydraConfig.get().launcher.get("_target_", ""))
    return "submitit" in target


def launcher_tasks() -> int:
    """How many tasks the running Hydra job's SLURM launcher starts for it (nodes x tasks per node); 1 for
    any other launcher or a single run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return 1
    launcher = HydraConfig.get().launcher
    if "SlurmLauncher" not in str(launcher.get("_target_", "")):
        return 1
    return int(launcher.get("nodes") or 1) * int(launcher.get("tasks_per_node") or 1)


def sbatch_script(launcher: dict[str, Any], command: str = "python -u -m submitit.core._submit FOLDER") -> str:
    """The sbatch file the SLURM launcher would submit for ``launcher`` (``hydra.launcher`` resolved), made
    without a cluster: the launcher's own translation of its keys, then submitit's own file writer."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    params = {k: v for k, v in launcher.items() if k != "_target_"}
    folder = params.pop("submitit_folder")
    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout", 0)
    )
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text(command, "preview")
