"""The console of a newcomer's first run: one line per phase, the step bar, and no third-party noise."""

import logging
import re
import warnings

from conftest import run_cli

NOISE = (
    "kernels-community",  # bitsandbytes' CPU backend, imported by peft
    "requires torchvision",  # transformers' image processors
    "Setting accelerator to CPU",  # DeepSpeed, imported by Lightning when installed
    "LeafSpec",  # Lightning on torch's pytree API
    "Writing model shards",
    "Loading weights",
    "Loading pipeline components",
    "Training:",  # Lightning's own bar before ours
)


def test_the_tiny_default_prints_phases_and_one_bar_and_no_known_noise(tmp_path):
    # a fresh demo folder, so the tiny pipeline is written (and loaded) in this run
    # the step bar, as a terminal shows it (redirected, as here, the run prints plain lines: test_progress_lines.py)
    result = run_cli(
        "train.py", f"demo_assets_dir={tmp_path / 'demo'}", f"output_dir={tmp_path / 'out'}", "max_train_steps=4",
        "callbacks.progress.plain=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = (result.stdout + result.stderr).replace("\r", "\n")
    for noise in NOISE:
        assert noise not in console, f"{noise!r} in the console:\n{console[-3000:]}"
    lines = [line for line in console.splitlines() if line.strip()]
    for name in ("scan", "load", "cache"):
        assert any(re.fullmatch(rf"tuner: {name}: .+ \(\d+\.\d s\)", line) for line in lines), name
    assert any(re.match(r"tuner: trained to step 4 in \d+ s; weights: ", line) for line in lines)
    bars = {line.split(":")[0] for line in lines if "%|" in line or "it/s]" in line or "step/s]" in line}
    assert bars == {"steps"}, bars  # the one step bar
    # the full detail is in train.log
    log = (tmp_path / "out" / "train.log").read_text()
    assert "trainable parameters" in log and "latent cache: encoded" in log


def test_the_filters_are_narrow():
    """Only the known messages are dropped: other warnings of the same loggers and modules still show."""
    from tuner.runtime.console import quiet_third_parties

    quiet_third_parties()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    known = {
        "transformers.utils.import_utils": "`X` requires torchvision (not installed); falling back",
        "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
        "DeepSpeed": "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
    }
    for name, message in known.items():
        logger = logging.getLogger(name)
        logger.addHandler(handler)  # (transformers' loggers do not propagate to the root)
        logger.warning(message)
        logger.warning(f"a real problem in {name}")
        logger.removeHandler(handler)
    assert seen == [f"a real problem in {name}" for name in known]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_third_parties()
        warnings.warn_explicit(
            "`isinstance(treespec, LeafSpec)` is deprecated",
            DeprecationWarning,
            "x.py",
            1,
            module="lightning.pytorch.utilities._pytree",
        )
        warnings.warn_explicit(
            "another lightning deprecation", DeprecationWarning, "x.py", 2, module="lightning.pytorch.trainer"
        )
    assert [str(w.message) for w in caught] == ["another lightning deprecation"]


def test_bitsandbytes_is_imported_only_by_runs_that_use_it(demo_dir, tmp_path):
    """peft imports bitsandbytes whenever it is installed (a second of start-up); train.py keeps it out of
    runs that use neither an 8-bit optimiser nor nf4, and lets it in for those that do."""
    import subprocess
    import sys

    from conftest import ROOT

    for optimizer, expected in (("adamw", False), ("adamw8bit", True)):
        argv = ["train.py", f"optimizer={optimizer}", f"demo_assets_dir={demo_dir}", f"output_dir={tmp_path / optimizer}"]
        argv += ["max_train_steps=1", "callbacks.validation.enabled=false", "trainer.enable_progress_bar=false"]
        code = (
            "import runpy, sys\n"
            f"sys.argv = {argv!r}\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
            "finally:\n    print('bitsandbytes loaded:', 'bitsandbytes.nn' in sys.modules)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"bitsandbytes loaded: {expected}" in result.stdout, optimizer
