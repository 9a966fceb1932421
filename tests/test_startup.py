"""Start-up shortcuts of the command line (tuner/runtime/startup.py): the garbage collector held off while the
libraries import and back on before weights load; Hydra's probe compose of ``hydra.mode`` skipped only
where nothing can set that key."""

import gc
import json
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from hydra import initialize_config_dir
from hydra._internal.hydra import Hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from tuner.runtime.startup import imports_done, mode_groups, mode_is_unset, skip_mode_probe

CONF = ROOT / "conf"


def test_the_collector_is_back_on_when_training_starts(demo_dir, tmp_path):
    probe = tmp_path / "gc.json"
    result = run_cli(
        "train.py",
        f"demo_assets_dir={demo_dir}",
        f"output_dir={tmp_path / 'out'}",
        "max_train_steps=1",
        "callbacks.validation.enabled=false",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
        "+callbacks.extra.gc._target_=probes.GarbageCollector",
        f"+callbacks.extra.gc.path={probe}",
        env={"PYTHONPATH": str(ROOT / "tests")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(probe.read_text())
    assert state["enabled"] is True
    young, _, old = state["stats"]
    # held off through the imports: with the collector on from the start, importing the libraries alone
    # runs over a thousand young-generation collections (about 70 here, all after it went back on)
    assert young["collections"] < 500, state
    # and what the imports left behind was collected in one full pass when it went back on
    assert old["collections"] >= 1 and old["collected"] > 1000, state


def test_imports_done_leaves_a_running_collector_alone():
    assert gc.isenabled()
    imports_done()
    assert gc.isenabled()
    gc.disable()
    try:
        imports_done()
        assert gc.isenabled()
    finally:
        gc.enable()


def test_the_shipped_config_sets_the_mode_only_in_hparams_search():
    assert mode_groups(CONF) == {"hparams_search"}
    assert mode_is_unset(CONF, ["model=sdxl", "data.path=/x", "optimizer.lr=1e-4", "+callbacks.extra.a._target_=b"], [])


@pytest.mark.parametrize(
    "overrides, argv",
    [
        (["hparams_search=lr"], []),
        (["+hparams_search=lr"], []),
        (["hparams_search@foo=lr"], []),
        (["hydra.mode=MULTIRUN"], []),
        (["+hydra.mode=MULTIRUN"], []),
        (["hydra.searchpath=[file:///elsewhere]"], []),
        ([], ["--config-dir=/elsewhere"]),
        ([], ["-cn", "other"]),
    ],
)
def test_anything_that_can_set_the_mode_keeps_hydras_probe(overrides, argv):
    assert not mode_is_unset(CONF, overrides, argv)


def _conf(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_a_user_config_that_sets_the_mode_or_picks_such_a_group_keeps_the_probe(tmp_path):
    conf = _conf(
        tmp_path,
        {
            "train.yaml": "defaults:\n  - optional sweep: null\n  - preset: a\nseed: 1\n",
            "sweep/many.yaml": "# @package _global_\nhydra:\n  mode: MULTIRUN\n",
            "preset/a.yaml": "# @package _global_\nseed: 2\n",
            "preset/b.yaml": "# @package _global_\ndefaults:\n  - override /sweep: many\n",
            "experiment/x.yaml": "# @package hydra\nmode: MULTIRUN\n",
        },
    )
    assert mode_groups(conf) == {"sweep", "experiment"}
    assert mode_is_unset(conf, [], []) is False  # preset/b.yaml may pick sweep/many.yaml
    (conf / "preset/b.yaml").unlink()
    assert mode_is_unset(conf, ["preset=a", "seed=3"], [])
    assert not mode_is_unset(conf, ["sweep=many"], [])
    assert not mode_is_unset(conf, ["+experiment=x"], [])
    (conf / "train.yaml").write_text("defaults:\n  - sweep: many\nseed: 1\n")  # the primary picks it itself
    assert not mode_is_unset(conf, [], [])


def test_the_patched_probe_answers_without_composing_only_when_it_may(monkeypatch):
    monkeypatch.setattr(Hydra, "get_mode", Hydra.get_mode)  # restored after the test
    skip_mode_probe(CONF, [])
    skip_mode_probe(CONF, [])  # once is enough; a second call does not wrap twice
    assert Hydra.get_mode(None, "train", ["model=sdxl"]) is None  # no Hydra instance: nothing was composed
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        assert Hydra.get_mode(hydra, "train", ["hparams_search=lr"]) == RunMode.MULTIRUN
        assert Hydra.get_mode(hydra, "train", ["hydra.mode=RUN"]) == RunMode.RUN
