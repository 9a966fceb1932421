"""What a run prints: one line per phase (scan, load, cache, train) with its time, the one step progress
bar, and the warnings that are about the run. Everything else goes to ``train.log`` only.

Known third-party noise is filtered narrowly, each by the logger or module it comes from *and* its
message, so a real warning from the same library still shows. Each entry says why it is noise here.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: phase lines: ``tuner: <phase>: <what> (<seconds> s)`` on the console at any TUNER_LOG_LEVEL
PHASE = logging.getLogger("tuner.phase")

# (logger, message fragment)
NOISY_LOGS = (
    # peft imports bitsandbytes whenever it is installed; its CPU backend then looks for an optional
    # kernels package, whether or not a bitsandbytes optimiser or nf4 is chosen
    ("bitsandbytes.backends.cpu.ops", "from kernels-community"),
    # transformers' image processors (never used by tuner) fall back from torchvision, which has no CPU wheel here
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
    # Lightning imports DeepSpeed whenever it is installed; on a machine without a GPU it says so at import
    ("DeepSpeed", "Setting accelerator to CPU"),
)
# (message regex, module regex) for warnings.filterwarnings
NOISY_WARNINGS = (
    # Lightning calling torch's own deprecated pytree API, once per run; nothing a user can change
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\."),
)


class _DropKnown(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_third_parties() -> None:
    """Install the narrow filters above, and turn off the weight loading/writing bars of transformers and
    diffusers (Hub download bars stay: a download is worth watching). Call before the libraries import."""
    for name, fragment in NOISY_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropKnown(fragment))
    for message, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components"
    huggingface_hub.utils.enable_progress_bars()  # transformers' switch turned the download bars off too


def keep_unused_packages_out(cfg) -> None:
    """peft imports bitsandbytes whenever it is installed: about a second of every start-up, and its
    notices. A run that uses it (an 8-bit optimiser, nf4) imports it as usual; for any other run the import
    is blocked, so peft carries on as it does without bitsandbytes. Undone for a later job of a sweep that
    needs it. Only the CLIs call this (train.py); a library user's imports are left alone."""
    import sys

    levels = [cfg.quantization.get("base_model_precision"), cfg.quantization.get("text_encoder_precision")]
    levels += list((cfg.quantization.get("text_encoders") or {}).values())
    uses = "bitsandbytes" in str(cfg.optimizer.get("_target_", "")) or "nf4-bnb" in levels
    if uses:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
    else:
        sys.modules.setdefault("bitsandbytes", None)


@contextmanager
def phase(name: str) -> Iterator[dict]:
    """Time a phase and report it in one line: set ``what`` in the yielded dict to say what it did."""
    start = time.monotonic()
    report: dict = {}
    yield report
    if not report.get("skip"):
        PHASE.info("%s: %s (%.1f s)", name, report.get("what", "done"), time.monotonic() - start)


class ConsoleFormatter(logging.Formatter):
    """Phase lines as ``tuner: ...``; everything else with time, level and logger."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.name == PHASE.name:
            return f"tuner: {record.getMessage()}"
        return super().format(record)


class ConsoleLevel(logging.Filter):
    """The console's level, with phase lines let through at any level."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or record.name == PHASE.name
