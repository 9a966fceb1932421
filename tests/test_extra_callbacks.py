"""Any Lightning callback from the command line, the Hydra way: +callbacks.extra.NAME._target_=..."""

import csv

from conftest import run_cli


def test_a_callback_added_on_the_command_line_runs(demo_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "train.py",
        f"demo_assets_dir={demo_dir}",
        f"output_dir={out}",
        "max_train_steps=2",
        "callbacks.validation.enabled=false",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
        "+callbacks.extra.stats._target_=lightning.pytorch.callbacks.DeviceStatsMonitor",
        "+callbacks.extra.stats.cpu_stats=true",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = out.glob("logs/*/metrics.csv")
    header = next(csv.reader(metrics.open()))
    assert any("DeviceStatsMonitor" in column and "cpu_percent" in column for column in header), header


def test_a_callback_that_is_not_one_fails_before_loading(tmp_path):
    result = run_cli(
        "train.py",
        f"output_dir={tmp_path}",
        "model.pretrained_model_name_or_path=/nonexistent",
        "+callbacks.extra.bad._target_=collections.OrderedDict",
    )
    assert result.returncode == 2
    assert "callbacks.extra.bad._target_=collections.OrderedDict is not a Lightning callback" in result.stderr
    result = run_cli("train.py", f"output_dir={tmp_path}", "+callbacks.extra.typo._target_=lightning.NoSuchCallback")
    assert (
        result.returncode == 2
        and "callbacks.extra.typo._target_=lightning.NoSuchCallback: cannot import" in result.stderr
    )
