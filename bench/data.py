"""Data pipeline benchmarks. Last line: ``scan_10k_s=… scan_10k_warm_s=… decode_speedup=… cached_step_ratio=…
checksum_step_ratio=… checksum_ms_sdxl_latent=… checksum_ms_t5_embed=…``.

- scan_10k_s: header scan and bucketing of 10,000 generated JPEGs with an empty scan cache (the OS
  file cache is warm: the files were just written); scan_10k_warm_s: the same with the scan cache.
- decode_speedup: decode + resize to the bucket, plain against JPEG draft mode (``load_rgb``), on
  3000x2000 photos-like JPEGs going to a 1024-px-area bucket.
- cached_step_ratio: the tiny SD training step with latents and text embeddings from the cache (each
  read verified against its checksum), against encoding them every step; median step times, same batch
  size and resolution.
- checksum_step_ratio: the same cached step with checksums on, against off. Off means
  ``datamodules.cache.checksum`` returns a constant in this process, for writing and reading alike, with
  entries of their own: a read parses the same metadata but computes no CRC.
- checksum_ms_sdxl_latent, checksum_ms_t5_embed: one ``checksum`` of an entry of a real model's size, the
  CRC every read adds: an SDXL 1024² latent (8 x 128 x 128 fp32, 0.5 MiB) and a Flux T5 prompt embedding
  (512 x 4096 fp32, 8 MiB). The tiny model's entries are far smaller, so the step ratio shows the
  machinery, these the cost at real sizes.

    python bench/data.py [--images 10000] [--workdir DIR] [--step-rounds 4] [--smoke]

``--video``: instead, the peak memory of decoding one clip window (datamodules/video.py). A long clip is
written (default 120 s of 3840x2160 at 24 fps), then a fresh process decodes one 81-frame window at 16 fps
from its middle into 832x480 (Wan's 480p) buckets, as training does (Linux: the peak is the kernel's VmHWM, reset
after the imports). Last line: ``video_window_peak_mib=…`` (that process's peak RSS above its start: FFmpeg's
buffers and the 81 kept frames) ``whole_clip_mib=…`` (the clip's
frames decoded, at 8-bit RGB) and ``video_window_share=…`` (their ratio: well below 1 means the clip was never
held whole).

    python bench/data.py --video [--video-seconds 120] [--video-size 3840x2160] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
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


def bench_checksum(repeats: int) -> dict[str, float]:
    """Median seconds of one ``checksum`` (what every cache read adds) over an entry of a real model's size."""
    import torch

    from datamodules.cache import checksum

    entries = {
        "sdxl_latent": {"encoded": torch.randn(8, 128, 128), "crop_top_left": torch.zeros(2, dtype=torch.long)},
        "t5_embed": {"prompt_embeds": torch.randn(512, 4096), "pooled_prompt_embeds": torch.randn(768)},
    }
    medians = {}
    for name, tensors in entries.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            checksum(tensors)
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times)
    return medians


@contextlib.contextmanager
def checksums_off():
    """Inside, ``datamodules.cache.checksum`` returns a constant: entries are written with it and every read
    matches it, so no CRC is computed on either side. Only for entries written inside (a cache of their own)."""
    import datamodules.cache as cache

    original = cache.checksum
    cache.checksum = lambda tensors: "off"
    try:
        yield
    finally:
        cache.checksum = original


VARIANTS = {  # name: (cache latents and text embeddings, checksums verified)
    "cached": (True, True),
    "unchecked": (True, False),
    "plain": (False, True),
}


def bench_cached_step(
    workdir: Path, steps: int, resolution: int, batch: int, rounds: int = 4, warmup: int = 5
) -> dict[str, float]:
    """Median step time of each of ``VARIANTS``, the runs interleaved (A B C A B C) so drift hits all alike;
    the least of each variant's medians. A step is timed from one batch start to the next (bench/step_timer.py,
    added through the config), so loading the batch counts, as it should."""
    import json
    import logging

    from common import compose_config

    from tuner.run import train

    logging.disable(logging.WARNING)
    medians: dict[str, list[float]] = {}
    for i in range(rounds):
        for name, (cached, checked) in VARIANTS.items():
            times = workdir / f"steps-{name}-{i}.json"
            cfg = compose_config(
                [
                    f"demo_assets_dir={workdir / 'demo'}",
                    f"output_dir={workdir / f'run-{name}-{i}'}",
                    f"data.cache_dir={workdir / f'stepcache-{name}'}",
                    f"data.cache_latents={cached}",
                    f"data.cache_text_embeds={cached}",
                    "data.crop_style=center",
                    f"data.resolution={resolution}",
                    f"data.batch_size={batch}",
                    f"max_train_steps={steps}",
                    "checkpointing_steps=0",
                    "callbacks.ema.enabled=false",  # the tiny preset turns these on; the bench times the step alone
                    "callbacks.validation.enabled=false",
                    "+callbacks.extra.steps._target_=bench.step_timer.StepStarts",
                    f"+callbacks.extra.steps.path={times}",
                    "logger=none",
                    "trainer.accelerator=cpu",
                    "trainer.enable_progress_bar=false",
                ]
            )
            with contextlib.nullcontext() if checked else checksums_off():
                train(cfg)
            starts = json.loads(times.read_text())
            gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
            medians.setdefault(name, []).append(statistics.median(gaps[warmup:]))
    return {name: min(values) for name, values in medians.items()}


def make_clip(path: Path, seconds: float, fps: int, size: tuple[int, int]) -> None:
    """A long clip: a gradient that scrolls, so every frame differs (MPEG-4 part 2, as the demo's)."""
    import av

    w, h = size
    base = np.add.outer(np.arange(h) * 255 // max(1, h - 1), np.arange(w) * 255 // max(1, w - 1)) // 2
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = 2_000_000
        for i in range(int(seconds * fps)):
            grey = ((base + 3 * i) % 256).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.stack([grey] * 3, axis=-1), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


_WINDOW_PROBE = """
import random, sys
sys.path.insert(0, {root!r})
from datamodules.images import resize_and_crop
from datamodules.video import decode, probe_clip, window

def status(key):  # kB, from the kernel's own accounting
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))

open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: the imports' peak does not count
start = status("VmRSS")
with open({path!r}, "rb") as fp:
    width, height, clip = probe_clip(fp)
rng = random.Random(0)
indices = window(clip, 81, 16, "start", rng)
middle = clip.frames // 2 - indices[-1] // 2
indices = [middle + i for i in indices]
with open({path!r}, "rb") as fp:
    frames = decode(fp, clip, indices, lambda f: resize_and_crop(f, (832, 480), "center", rng)[0])
peak = status("VmHWM")
print(len(frames), width, height, clip.frames, (peak - start) / 1024)
"""


def bench_video_window(work: Path, seconds: float, size: tuple[int, int]) -> dict[str, float]:
    """Peak RSS of decoding one 81-frame window of a long clip, in a fresh process."""
    import subprocess

    path = work / f"long_{size[0]}x{size[1]}_{seconds:g}s.mp4"
    if not path.exists():
        started = time.monotonic()
        make_clip(path, seconds, 24, size)
        print(f"wrote {path.name} ({path.stat().st_size / 2**20:.0f} MiB) in {time.monotonic() - started:.0f} s")
    code = _WINDOW_PROBE.format(root=str(ROOT), path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    kept, width, height, frames, peak = int(out[0]), int(out[1]), int(out[2]), int(out[3]), float(out[4])
    whole = frames * width * height * 3 / 2**20
    return {"kept": kept, "frames": frames, "peak": peak, "whole": whole}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=None, help="JPEGs to scan (default 10000; --smoke 200)")
    parser.add_argument("--workdir", default=None, help="keep generated images here between runs")
    parser.add_argument("--step-resolution", type=int, default=None, help="default 128; --smoke 64")
    parser.add_argument("--step-batch", type=int, default=None, help="default 4; --smoke 2")
    parser.add_argument("--step-rounds", type=int, default=4, help="runs of each step variant, interleaved")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks the code path")
    parser.add_argument("--video", action="store_true", help="only the clip-window decode's peak memory")
    parser.add_argument("--video-seconds", type=float, default=None, help="the long clip's length (default 120)")
    parser.add_argument("--video-size", default=None, help="the long clip's WxH (default 3840x2160)")
    args = parser.parse_args()
    if args.video:
        seconds = args.video_seconds or (12 if args.smoke else 120)
        size = tuple(int(v) for v in (args.video_size or ("640x360" if args.smoke else "3840x2160")).split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.workdir or tmp)
            work.mkdir(parents=True, exist_ok=True)
            got = bench_video_window(work, seconds, size)
        print(
            f"decoded {got['kept']} of {got['frames']} frames ({size[0]}x{size[1]}) into 832x480: peak RSS "
            f"+{got['peak']:.0f} MiB; the whole clip decoded would be {got['whole']:.0f} MiB"
        )
        print(
            f"video_window_peak_mib={got['peak']:.0f} whole_clip_mib={got['whole']:.0f} "
            f"video_window_share={got['peak'] / got['whole']:.4f}"
        )
        return
    smoke = args.smoke
    images = args.images or (200 if smoke else 10_000)
    resolution = args.step_resolution or (64 if smoke else 128)
    batch = args.step_batch or (2 if smoke else 4)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        make_jpegs(work / "jpegs", images)
        cold, warm, n = bench_scan(work / "jpegs", Path(tmp) / "scancache")
        print(f"scan of {n} JPEGs: cold {cold:.2f} s, warm {warm:.2f} s")
        speedup = bench_decode(work / "photos", n=2 if smoke else 40)
        print(f"decode + resize to bucket: draft mode {speedup:.2f}x faster")
        crc = bench_checksum(repeats=5 if smoke else 50)
        print(
            f"checksum of one entry: SDXL 1024² latent {crc['sdxl_latent'] * 1e3:.2f} ms, "
            f"Flux T5 embedding {crc['t5_embed'] * 1e3:.2f} ms"
        )
        sizes = dict(steps=6, rounds=1, warmup=2) if smoke else dict(steps=30, rounds=args.step_rounds, warmup=5)
        step = bench_cached_step(Path(tmp), resolution=resolution, batch=batch, **sizes)
        print(
            f"tiny SD step: cached {step['cached'] * 1e3:.1f} ms (checksums off {step['unchecked'] * 1e3:.1f} ms), "
            f"encoding each step {step['plain'] * 1e3:.1f} ms"
        )
        print(
            f"scan_10k_s={cold * 10_000 / n:.2f} scan_10k_warm_s={warm * 10_000 / n:.2f} "
            f"decode_speedup={speedup:.2f} cached_step_ratio={step['cached'] / step['plain']:.3f} "
            f"checksum_step_ratio={step['cached'] / step['unchecked']:.3f} "
            f"checksum_ms_sdxl_latent={crc['sdxl_latent'] * 1e3:.3f} checksum_ms_t5_embed={crc['t5_embed'] * 1e3:.3f}"
        )


if __name__ == "__main__":
    main()
