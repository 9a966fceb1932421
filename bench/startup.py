"""Start-up: process start to the end of the first optimiser step, tuner against a plain script.

For the tiny SD 1.5 and the tiny SDXL, with 64 images, batch 4, 64 px, fp32, LoRA rank 4, on the CPU: each
round runs ``python train.py`` (a marker callback, bench/startup_marker.py, writes the time its first
optimiser step ends) and ``python bench/startup_plain.py`` (the same load and one step with diffusers + peft
+ torch directly), in fresh processes, the order alternating between rounds; the figure is the ratio of
the medians. tuner runs with its defaults (latent and text caches on, filled before the first step, each
round into a fresh cache), validation and EMA off, as the plain script has neither.

    python bench/startup.py [--rounds 5] [--families sd15,sdxl] [--smoke]

Last line: ``startup_ratio_sd15=… startup_ratio_sdxl=…`` (tuner / plain; goal ≤ 1.0), after the seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, n: int = 64) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (64, 64), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
        ImageDraw.Draw(img).ellipse((8 + i % 16, 8, 48, 40 + i % 20), fill=(255 - (37 * i) % 256, 40, 200))
        img.save(folder / f"shape {i:02d}.png")
    return folder


def _run(cmd: list[str], marker: Path) -> float:
    env = {**os.environ, "TUNER_LOG_LEVEL": "WARNING"}
    env.pop("TUNER_RUN_ID", None)
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not marker.exists():
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return float(marker.read_text()) - start


def tuner_cmd(family: str, pipeline: Path, images: Path, work: Path, marker: Path) -> list[str]:
    return [
        sys.executable,
        "train.py",
        f"model={family}",
        f"model.pretrained_model_name_or_path={pipeline}",
        f"data.path={images}",
        "data.resolution=64",
        "data.bucket_step=16",
        "data.batch_size=4",
        f"data.cache_dir={work / 'cache'}",
        "model.lora.rank=4",
        "max_train_steps=1",
        "checkpointing_steps=0",
        "callbacks.validation.enabled=false",
        "callbacks.ema.enabled=false",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"output_dir={work / 'out'}",
        "+callbacks.extra.startup._target_=bench.startup_marker.FirstStep",
        f"+callbacks.extra.startup.path={marker}",
    ]


def plain_cmd(family: str, pipeline: Path, images: Path, marker: Path) -> list[str]:
    script = str(ROOT / "bench" / "startup_plain.py")
    return [
        sys.executable,
        script,
        f"--family={family}",
        f"--pipeline={pipeline}",
        f"--images={images}",
        f"--marker={marker}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--families", default="sd15,sdxl")
    ap.add_argument("--smoke", action="store_true", help="SD 1.5, 1 round: checks the code path")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.families = 1, "sd15"
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = _images(root / "images")
        for family in args.families.split(","):
            pipeline = root / family
            subprocess.run(
                [sys.executable, "-m", "tuner.tiny", family, str(pipeline)], cwd=ROOT, check=True, capture_output=True
            )
            times = {"tuner": [], "plain": []}
            # round 0 warms the OS file cache and is not counted (--smoke skips it)
            for i in range(int(args.smoke), args.rounds + 1):
                order = ["tuner", "plain"] if i % 2 else ["plain", "tuner"]
                for who in order:
                    work = root / f"{family}-{who}-{i}"
                    marker = work / "first_step"
                    work.mkdir()
                    cmd = (
                        tuner_cmd(family, pipeline, images, work, marker)
                        if who == "tuner"
                        else plain_cmd(family, pipeline, images, marker)
                    )
                    seconds = _run(cmd, marker)
                    if i:
                        times[who].append(seconds)
            t, p = statistics.median(times["tuner"]), statistics.median(times["plain"])
            print(
                f"{family}: tuner {t:.2f} s, plain {p:.2f} s (medians of {args.rounds}; tuner {times['tuner']}, plain {times['plain']})"
            )
            figures[f"startup_ratio_{family}"] = t / p
            figures[f"tuner_{family}_s"], figures[f"plain_{family}_s"] = t, p
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
