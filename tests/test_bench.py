"""Every bench runs: a bench that nothing runs rots (its last run found bench/data.py broken by a changed
signature). Each ``bench/*.py`` with a ``main`` is run with ``--smoke`` (tiny sizes, the CPU) and must end in
``key=value`` figures; a new bench is picked up by the glob."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELPERS = {"startup_plain.py"}  # run by bench/startup.py with its own arguments; not a bench
BENCHES = sorted(p for p in (ROOT / "bench").glob("*.py") if "def main(" in p.read_text() and p.name not in HELPERS)


def smoke(bench: Path, work: Path) -> str | None:
    """What is wrong with ``bench --smoke``, or None."""
    cmd = [sys.executable, str(bench.relative_to(ROOT)), "--smoke"]
    source = bench.read_text()
    cmd += next(([flag, str(work / bench.stem)] for flag in ("--workdir", "--work") if f'"{flag}"' in source), [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return f"{bench.name}: still running after 300 s"
    if proc.returncode:
        return f"{bench.name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        for pair in lines[-1].split():
            key, value = pair.split("=", 1)
            float(value)  # nan included: a figure that means nothing off a GPU still parses
    except (IndexError, ValueError):
        return f"{bench.name}: the last line is not key=value figures: {lines[-1:]}"
    return None


def test_every_bench_smoke_runs_and_ends_in_figures(tmp_path):
    assert len(BENCHES) >= 8, [p.name for p in BENCHES]
    # each run has one thread: two at a time keep both cores busy, one beside another pytest-xdist worker
    with ThreadPoolExecutor(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2) as pool:
        problems = [p for p in pool.map(lambda bench: smoke(bench, tmp_path), BENCHES) if p]
    assert not problems, "\n\n".join(problems)
