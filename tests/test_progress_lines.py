"""Progress when stdout is not a terminal (SLURM, nohup, a file): plain lines at a steady rate, not the bar's
carriage-return refreshes (issue 23)."""

import re
from types import SimpleNamespace

from conftest import run_cli

from callbacks.progress_lines import StepProgressLines, format_duration, line_due, steps_between_lines

LINE = re.compile(r"step (\d+)/(\d+) \((\d+)%\)  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d\d  \d+\.\d\d it/s  ETA \S+")


def test_a_redirected_run_prints_plain_lines_at_the_percent_rule(tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "train.py",
        f"output_dir={out}",
        "max_train_steps=20",
        "checkpointing_steps=1000",
        "callbacks.validation.enabled=false",
        "callbacks.progress.every_s=0",
        "callbacks.progress.every_percent=25",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stdout and "\r" not in result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert all(LINE.fullmatch(line) for line in lines), lines
    steps = [int(LINE.fullmatch(line)[1]) for line in lines]
    assert steps == [5, 10, 15, 20], lines  # every 25% of 20 steps; the last step's line is the final one
    assert lines[-1].startswith("step 20/20 (100%)") and lines[-1].endswith("ETA 0s")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _trainer(step: int, total: int) -> SimpleNamespace:
    optimizer = SimpleNamespace(param_groups=[{"lr": 1e-4}])
    return SimpleNamespace(
        global_step=step,
        estimated_stepping_batches=total,
        progress_bar_metrics={"train/loss_step": 0.5},
        optimizers=[optimizer],
    )


def _run(lines: StepProgressLines, clock: FakeClock, start: int, total: int, seconds_per_step: float, stop=None):
    """Drive the callback through steps start+1..stop (default: total), one fake step every ``seconds_per_step``."""
    printed: list[str] = []
    lines.print = printed.append
    trainer = _trainer(start, total)
    lines.on_train_start(trainer)
    for step in range(start + 1, (stop or total) + 1):
        clock.now += seconds_per_step
        trainer.global_step = step
        lines.on_train_batch_end(trainer, None)
    lines.on_train_end(trainer, None)
    return printed


def test_the_rarer_of_seconds_and_percent_decides():
    assert steps_between_lines(600, 1) == 6 and steps_between_lines(50, 1) == 1 and steps_between_lines(None, 1) == 1
    assert line_due(6, 30, 6, 30) and not line_due(5, 100, 6, 30) and not line_due(100, 29.9, 6, 30)
    # 600 steps at 10 steps/s: 1% (6 steps) is 0.6 s, so 30 s decides: a line every 300 steps
    clock = FakeClock()
    printed = _run(StepProgressLines(30, 1, clock=clock), clock, 0, 600, 0.1)
    assert [p.split()[1] for p in printed] == ["300/600", "600/600"]
    assert printed[0] == "step 300/600 (50%)  loss 0.5000  lr 1.00e-04  10.00 it/s  ETA 30s"
    # 600 steps at 1 step/min: 30 s is every step, so 1% decides: a line every 6 steps, ETA from that interval
    clock = FakeClock()
    printed = _run(StepProgressLines(30, 1, clock=clock), clock, 0, 600, 60)
    assert len(printed) == 100 and printed[0] == "step 6/600 (1%)  loss 0.5000  lr 1.00e-04  0.02 it/s  ETA 9h54m"


def test_a_resumed_run_counts_from_its_resumed_step_and_ends_with_a_final_line():
    clock = FakeClock()
    printed = _run(StepProgressLines(0, 30, clock=clock), clock, 500, 600, 0.5)
    # 30% of 600 is 180 steps: none are due in the 100 left, so only the final line, at the rate since step 500
    assert printed == ["step 600/600 (100%)  loss 0.5000  lr 1.00e-04  2.00 it/s  ETA 0s"]
    clock = FakeClock()
    printed = _run(StepProgressLines(0, 30, clock=clock), clock, 0, 600, 0.5, stop=250)  # stopped early
    assert printed == [
        "step 180/600 (30%)  loss 0.5000  lr 1.00e-04  2.00 it/s  ETA 3m30s",
        "step 250/600 (42%)  loss 0.5000  lr 1.00e-04  2.00 it/s  ETA 2m55s",
    ]
    assert format_duration(45) == "45s" and format_duration(150) == "2m30s" and format_duration(3720) == "1h02m"
