"""Data pipeline benchmarks. Last line: ``scan_10k_s=… scan_10k_warm_s=… decode_speedup=… cached_step_ratio=…``.

- scan_10k_s: header scan and bucketing of 10,000 generated JPEGs with an empty scan cache (the OS
  file cache is warm: the files were just written); scan_10k_warm_s: the same with the scan cache.
- decode_speedup: decode + resize to the bucket, plain against JPEG draft mode (``load_rgb``), on
  3000x2000 photos-like JPEGs going to a 1024-px-area bucket.
- cached_step_ratio: the tiny SD training step with latents and text embeddings from the cache,
  against encoding them every step; median step times, same batch size and resolution.

    python bench/data.py [--images 10000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_jpegs(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` small JPEGs of assorted sizes and aspect ratios (noise, so they compress like photos)."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) >= n:
        return
    rng = random.Random(seed)
    noise = Image.effect_noise((640, 640), 64).convert("RGB")
    for i in range(n):
        w, h = rng.choice([(512, 512), (640, 480), (480, 640), (600, 400), (400, 600), (640, 360)])
        noise.crop((0, 0, w, h)).save(folder / f"image {i:05d}.jpg", quality=85)


def bench_scan(folder: Path, cache: Path) -> tuple[float, float, int]:
    from datamodules import DiffusionDataModule

    def scan() -> tuple[float, int]:
        dm = DiffusionDataModule(path=str(folder), resolution=1024, cache_dir=str(cache))
        start = time.perf_counter()
        samples = dm.scan()
        return time.perf_counter() - start, len(samples)

    cold, n = scan()
    warm, _ = scan()
    return cold, warm, n


def bench_decode(folder: Path, n: int = 40) -> float:
    from datamodules.buckets import bucket_for
    from datamodules.images import load_rgb, resize_and_crop

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        path = folder / f"photo {i}.jpg"
        if not path.exists():
            # Smooth gradients plus noise: compresses and decodes like a photograph.
            y, x = np.mgrid[0:2000, 0:3000]
            base = np.stack([(x / 12) % 256, (y / 8) % 256, ((x + y) / 20) % 256], -1)
            img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(path, quality=90)
        files.append(path)
    bucket = bucket_for(3000, 2000, 1024, "area")

    def plain(path):
        with Image.open(path) as im:
            img = im.convert("RGB")
        return resize_and_crop(img, bucket, "center", random.Random(0))

    def draft(path):
        with open(path, "rb") as f:
            img = load_rgb(f, cover=bucket)
        return resize_and_crop(img, bucket, "center", random.Random(0))

    times = {plain: [], draft: []}
    for _ in range(3):
        for fn in (plain, draft):
            start = time.perf_counter()
            for path in files:
                fn(path)
            times[fn].append(time.perf_counter() - start)
    return min(times[plain]) / min(times[draft])


def bench_cached_step(workdir: Path, steps: int = 30, resolution: int = 128, batch: int = 4) -> tuple[float, float]:
    import logging

    import lightning as L
    from common import compose_config

    from tuner.run import train

    logging.disable(logging.WARNING)
    medians = {}
    for cached in (True, False, True, False):

        class StepTimer(L.Callback):
            """Wall time from one batch start to the next: loading the batch counts, as it should."""

            starts: list[float] = []

            def on_train_batch_start(self, *a):
                self.starts.append(time.perf_counter())

        cfg = compose_config(
            [
                f"demo_assets_dir={workdir / 'demo'}",
                f"output_dir={workdir / f'run-{cached}-{len(medians)}'}",
                f"data.cache_dir={workdir / 'stepcache'}",
                f"data.cache_latents={cached}",
                f"data.cache_text_embeds={cached}",
                "data.crop_style=center",
                f"data.resolution={resolution}",
                f"data.batch_size={batch}",
                f"max_train_steps={steps}",
                "checkpointing_steps=0",
                "callbacks.ema.enabled=false",  # the tiny preset turns these on; the bench times the step alone
                "callbacks.validation.enabled=false",
                "logger=none",
                "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false",
            ]
        )
        import tuner.run as run

        original = run.build_trainer

        def with_timer(cfg, out, datamodule=None, _orig=original):
            trainer = _orig(cfg, out, datamodule)
            trainer.callbacks.append(StepTimer())
            return trainer

        run.build_trainer = with_timer
        try:
            train(cfg)
        finally:
            run.build_trainer = original
        gaps = [b - a for a, b in zip(StepTimer.starts, StepTimer.starts[1:], strict=False)]
        medians.setdefault(cached, []).append(statistics.median(gaps[5:]))
    cached_ms, plain_ms = min(medians[True]), min(medians[False])
    return cached_ms, plain_ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workdir", default=None, help="keep generated images here between runs")
    parser.add_argument("--step-resolution", type=int, default=128)
    parser.add_argument("--step-batch", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        make_jpegs(work / "jpegs", args.images)
        cold, warm, n = bench_scan(work / "jpegs", Path(tmp) / "scancache")
        print(f"scan of {n} JPEGs: cold {cold:.2f} s, warm {warm:.2f} s")
        speedup = bench_decode(work / "photos")
        print(f"decode + resize to bucket: draft mode {speedup:.2f}x faster")
        cached, plain = bench_cached_step(Path(tmp), resolution=args.step_resolution, batch=args.step_batch)
        print(f"tiny SD step: cached {cached * 1e3:.1f} ms, encoding each step {plain * 1e3:.1f} ms")
        print(
            f"scan_10k_s={cold * 10_000 / n:.2f} scan_10k_warm_s={warm * 10_000 / n:.2f} "
            f"decode_speedup={speedup:.2f} cached_step_ratio={cached / plain:.3f}"
        )


if __name__ == "__main__":
    main()
