"""Shared fixtures: the real Hydra config, composed and shrunk; tiny pipelines written once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from tuner.config import register

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

register()


def pytest_configure(config):
    # Under pytest-xdist (-n 2 on 2 cores) each worker, and each process it starts, computes on one thread:
    # two workers with two threads each would oversubscribe the cores and slow every step several times.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # A family's matrix runs train once per worker that asks for them, so the tests reading them share a worker
    # (pytest-xdist's --dist loadgroup groups the tests of one xdist_group mark).
    for item in items:
        if "matrix_run" in getattr(item, "fixturenames", ()):
            params = getattr(getattr(item, "callspec", None), "params", {})
            item.add_marker(pytest.mark.xdist_group(f"matrix-{params.get('family', 'sd15')}"))
    if os.environ.get("PYTEST_XDIST_WORKER") and config.getvalue("loadgroup"):  # set on workers under --dist loadgroup
        _name_groups(items)


def _name_groups(items) -> None:
    """Put each test's xdist group into its node id (``...::test[sd15]@matrix-sd15``), which is where the
    controller's loadgroup scheduler reads it. pytest-xdist 3.8 does this by setting ``Item._nodeid``, which
    pytest 9 no longer reads (the id is ``Item._id``), so without this every group was ignored and a family's
    matrix runs trained on both workers."""
    from _pytest.nodeid import coerce_node_id

    for item in items:
        groups = sorted(
            {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
        )
        nodeid = item.nodeid.split("@")[0] if item.nodeid.rfind("@") > item.nodeid.rfind("]") else item.nodeid
        if groups and hasattr(item, "_id"):
            item._id = coerce_node_id(f"{nodeid}@{'_'.join(groups)}")


@pytest.fixture(scope="session", autouse=True)
def tuner_home(tmp_path_factory):
    """Shared caches and demo assets go to a temp folder, never the user's ~/.cache/tuner."""
    home = tmp_path_factory.mktemp("tuner_home")
    old = os.environ.get("TUNER_HOME")
    os.environ["TUNER_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("TUNER_HOME", None)
    else:
        os.environ["TUNER_HOME"] = old


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """Tiny pipelines for every family plus the demo images, built once for the whole session."""
    from datamodules.demo import write_images
    from tuner.config.families import families, write_tiny

    root = tmp_path_factory.mktemp("demo")
    for family in families():
        write_tiny(family, root / family)
    write_images(root / "images")
    return root


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides or []))


@pytest.fixture
def make_cfg(demo_dir, tmp_path):
    """Compose the real config with the tiny demo assets, a temp output_dir and a few quiet steps."""

    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return tiny_cfg(demo_dir, output_dir or tmp_path / "out", *overrides)

    return make


def tiny_cfg(demo_dir: Path, output_dir: Path, *overrides: str) -> DictConfig:
    """make_cfg's config, for a fixture that cannot take the function-scoped ``tmp_path``."""
    cfg = compose_cfg(
        [
            f"demo_assets_dir={demo_dir}",
            f"output_dir={output_dir}",
            "max_train_steps=4",
            "checkpointing_steps=2",
            "trainer.enable_progress_bar=false",
            *overrides,
        ]
    )
    with open_dict(cfg):
        cfg.trainer.accelerator = "cpu"
    return cfg


# The family matrix's runs (tests/test_train.py), on top of make_cfg's settings: each kind is one or more stages,
# trained in turn into one output_dir. The LoRA run is also the straight run of the resume test (so it carries that
# test's raised caption dropout, whose RNG a resume must restore) and of the EMA tests (their decay, under which six
# steps move the average visibly).
LORA = ("optimizer.lr=5e-2", "data.caption_dropout_probability=0.3", "callbacks.ema.decay=0.9", "max_train_steps=6")
MATRIX_RUNS = {
    "lora": [LORA],
    "resumed": [(*LORA, "max_train_steps=4"), (*LORA, "resume_from_checkpoint=latest")],  # k=4 (a checkpoint), N=6
    "full": [("model.finetune=full", "optimizer.lr=1e-3", "max_train_steps=3")],
    "int8": [("quantization=int8-quanto", "max_train_steps=2")],
}


@dataclass(frozen=True)
class MatrixRun:
    dir: Path  # the finished run's output_dir: read it, never write into it (other tests read it too)
    loss: float | None  # what train() returned (its last stage's)


@pytest.fixture(scope="session")
def matrix_run(demo_dir, tmp_path_factory):
    """``matrix_run(family, kind)``: the family's run of that MATRIX_RUNS kind, trained the first time a test asks
    for it, then shared by every test that checks it: a family's runs train once a session, however many tests
    read them."""
    done: dict[tuple[str, str], MatrixRun | BaseException] = {}

    def get(family: str, kind: str) -> MatrixRun:
        key = (family, kind)
        if key not in done:
            try:
                done[key] = _train_stages(demo_dir, tmp_path_factory.mktemp(f"{family}-{kind}"), family, kind)
            except Exception as err:
                done[key] = err  # the first test shows the traceback; the others say so, without retraining
                raise
        if isinstance(done[key], BaseException):
            pytest.fail(f"the {family} {kind} run failed in an earlier test: {done[key]!r}", pytrace=False)
        return done[key]

    return get


def _train_stages(demo_dir: Path, out: Path, family: str, kind: str) -> MatrixRun:
    from tuner.run import train

    for overrides in MATRIX_RUNS[kind]:
        # validation still samples every prompt and measures its loss; two denoising steps serve the checks as
        # well as the preset's ten, and sampling was most of a tiny run's time
        loss = train(
            tiny_cfg(demo_dir, out, f"model={family}", "callbacks.validation.num_inference_steps=2", *overrides)
        )
    return MatrixRun(out, loss)


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command line of this project (``train.py ...`` or ``-m tuner.x ...``) in a fresh process."""
    full_env = {**os.environ, "TUNER_LOG_LEVEL": "WARNING", **(env or {})}
    full_env.pop("TUNER_RUN_ID", None)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def start_train(args: list[str], cwd: Path = ROOT) -> subprocess.Popen:
    """``python train.py ARGS`` in the background (to signal or kill it mid-run)."""
    env = {**os.environ, "TUNER_LOG_LEVEL": "WARNING"}
    env.pop("TUNER_RUN_ID", None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until ``path`` exists, failing with the process's stderr if it ends first."""
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def generate(pipe, seed: int = 0):
    """One 64 x 64 image (numpy, HWC in [0, 1]; a video family's clip: FHWC) from a family's diffusers pipeline,
    3 steps, a fixed seed, with the family's own sampling inputs (IF's stage II needs an image to upscale, a video
    family's a few frames)."""
    import numpy as np
    import torch

    from tuner.config.families import families, family_class

    # the exact class: IF's two stages are different pipelines
    classes = [family_class(f) for f in families()]
    extra = next((c.sampling_inputs(64, 64, pipe) for c in classes if type(pipe) is c.pipeline_class), {})
    out = pipe(
        prompt="a red circle on white",  # by name: FLUX.2's pipelines take an image first
        **extra,
        num_inference_steps=3,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    )
    frames = getattr(out, "frames", None)  # a video pipeline's (B, F, H, W, 3)
    return out.images[0] if frames is None else np.asarray(frames[0])


def point_hub_at(monkeypatch, url: str) -> None:
    """huggingface_hub, for this test, talks to the Hub served at ``url`` (on 127.0.0.1) and to nothing else:
    online, no proxy, no Xet, no telemetry (which would fetch a registry from the real Hub)."""
    from huggingface_hub import constants as hf_constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub reads these once, at import: set the values the environment above asks for
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
