"""After a multirun: ``sweep_summary.csv`` and ``sweep_summary.png`` in the sweep directory.

A Hydra callback (``hydra.callbacks.sweep_summary`` in conf/train.yaml). Each job's return value is
the sweep metric (``val/loss`` when validation runs, else the final train loss); the best (lowest)
job is marked in both files.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        overrides = list(job_return.overrides or [])
        try:
            metric = job_return.return_value
        except Exception:  # noqa: BLE001 - a failed job has no value; it is listed as failed
            metric = None
        self.rows.append(
            {
                "job": int(config.hydra.job.num) if "num" in config.hydra.job else len(self.rows),
                "overrides": " ".join(overrides),
                "metric": None if metric is None else float(metric),
                "status": job_return.status.name if hasattr(job_return.status, "name") else str(job_return.status),
            }
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.rows:
            return
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        scored = [r for r in self.rows if r["metric"] is not None and math.isfinite(r["metric"])]
        best = min(scored, key=lambda r: r["metric"]) if scored else None
        with (folder / "sweep_summary.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["job", "overrides", "metric", "status", "best"])
            writer.writeheader()
            for row in sorted(self.rows, key=lambda r: r["job"]):
                writer.writerow({**row, "best": row is best})
        if scored:
            plot(scored, best, folder / "sweep_summary.png")
        if best is not None:
            log.warning("sweep: best job %d (%s), metric %.6g", best["job"], best["overrides"], best["metric"])
            print(
                f"tuner: sweep summary in {folder / 'sweep_summary.csv'}; best job {best['job']}: {best['overrides']}"
            )


def _swept_value(rows: list[dict[str, Any]]) -> tuple[str, list[float]] | None:
    """The one numeric override that differs between jobs, as x values; None if there is no such one."""
    parsed = [dict(o.split("=", 1) for o in r["overrides"].split() if "=" in o) for r in rows]
    keys = [k for k in parsed[0] if len({p.get(k) for p in parsed}) > 1]
    if len(keys) != 1:
        return None
    xs = [_number(p.get(keys[0], "")) for p in parsed]
    return (keys[0], xs) if all(x is not None for x in xs) else None


def plot(rows: list[dict[str, Any]], best: dict[str, Any] | None, path: Path, size=(640, 400)) -> None:
    """The metric against the swept value (log scale when it spans a decade), best point in red."""
    swept = _swept_value(rows)
    name, xs = swept if swept else ("job", [float(r["job"]) for r in rows])
    log_x = min(xs) > 0 and max(xs) / min(xs) >= 10
    tx = [math.log10(x) if log_x else x for x in xs]
    ys = [r["metric"] for r in rows]
    w, h, m = size[0], size[1], 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([m, m // 2, w - m // 2, h - m], outline="black")

    def to_px(x: float, y: float) -> tuple[float, float]:
        x0, x1 = min(tx), max(tx)
        y0, y1 = min(ys), max(ys)
        fx = (x - x0) / (x1 - x0) if x1 > x0 else 0.5
        fy = (y - y0) / (y1 - y0) if y1 > y0 else 0.5
        fx, fy = 0.05 + 0.9 * fx, 0.05 + 0.9 * fy  # keep points off the frame
        return m + fx * (w - 1.5 * m), (h - m) - fy * (h - 1.5 * m)

    order = sorted(range(len(rows)), key=lambda i: tx[i])
    points = [to_px(tx[i], ys[i]) for i in order]
    if len(points) > 1:
        draw.line(points, fill=(40, 80, 200), width=2)
    for i in order:
        px, py = to_px(tx[i], ys[i])
        colour = (220, 30, 30) if rows[i] is best else (40, 80, 200)
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour)
        draw.text((px + 7, py - 12), f"{xs[i]:g}", fill="black")
    draw.text((m, h - m + 10), f"{name}{' (log scale)' if log_x else ''}", fill="black")
    draw.text((m, 8), f"sweep metric: min {min(ys):.5g}, max {max(ys):.5g}; best in red", fill="black")
    img.save(path)
