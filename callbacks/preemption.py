"""The signal SLURM sends ahead of a time limit or preemption: submitit's (USR2 unless ``SUBMITIT_PREEMPT_SIGNAL``
names another). Here, in the floor that catches it (callbacks/checkpoints.py); tuner/runtime/cluster.py, which requeues the
job, reads it from here."""

from __future__ import annotations

import os
import signal

PREEMPT_SIGNAL = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
