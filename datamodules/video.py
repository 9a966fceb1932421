"""Video clips: probing, the frame window a sample takes, and streaming decode of just that window.

PyAV (``av``, whose wheels carry FFmpeg) is imported only when a dataset holds a clip. A clip yields
``num_frames`` frames at ``frame_rate`` (its own rate when unset), from a window chosen by ``frame_sampling``:

- ``start``: the first frames;
- ``uniform``: ``num_frames`` frames spread evenly over the whole clip (``frame_rate`` does not apply);
- ``random``: a window at a random start, drawn per use from the sample's seeded generator, so a resumed
  run draws the same (and such clips are not latent-cached, as random crops are not).

Decoding seeks to the window and converts only the frames it keeps, each brought to its bucket as it comes:
a long 4K clip is never held whole in memory.

An animated GIF or WebP is a clip too (PIL decodes it): its frame rate is its frame count over its running
time, and each frame of a window is the one on screen at that time, so uneven frame durations play as shown.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v"})
# Images that may be animations: a clip for a video family (decoded by PIL), their first frame for the others
ANIMATED_EXTENSIONS = frozenset({".gif", ".webp"})
# A GIF frame without a duration, or with one under 20 ms, is shown for 100 ms by browsers: so it is here
MIN_FRAME_MS, DEFAULT_FRAME_MS = 20, 100
FRAME_SAMPLING = ("start", "uniform", "random")


@dataclass(frozen=True)
class Clip:
    """What the scan knows of a clip: its frame rate and frame count (``duration`` follows)."""

    fps: float
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps


def _av():
    try:
        import av
    except ImportError as err:  # reported as the clip's reason: the scan goes on with the images
        raise OSError('video clips need PyAV: pip install -e ".[video]"') from err
    return av


def probe_clip(fp: BinaryIO) -> tuple[int, int, Clip]:
    """(width, height, Clip) from the container's headers; the frame count is counted from the duration
    where the container does not store it (WebM)."""
    av = _av()
    with av.open(fp) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise ValueError("no frame rate")
        fps = float(rate)
        frames = stream.frames
        if not frames:
            if stream.duration is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / 1_000_000
            else:
                raise ValueError("no frame count or duration")
            frames = int(math.floor(seconds * fps + 1e-6))
        width, height = stream.codec_context.width, stream.codec_context.height
    if frames < 1 or width < 1 or height < 1:
        raise ValueError(f"empty video ({width}x{height}, {frames} frames)")
    return width, height, Clip(fps, int(frames))


def shortfall(clip: Clip, num_frames: int, frame_rate: float | None, sampling: str) -> str | None:
    """Why ``clip`` cannot give ``num_frames`` frames at ``frame_rate`` (None: it can)."""
    if sampling == "uniform" or num_frames <= 1:
        return None if clip.frames >= num_frames else f"too short: {clip.frames} frames, data.num_frames={num_frames}"
    rate = frame_rate or clip.fps
    needed = (num_frames - 1) / rate  # seconds from the first frame to the last
    if (clip.frames - 1) / clip.fps + 1e-9 >= needed:
        return None
    return (
        f"too short: {clip.duration:.2f} s at {clip.fps:g} fps; data.num_frames={num_frames} at {rate:g} fps needs "
        f"{needed + 1 / rate:.2f} s"
    )


def window(clip: Clip, num_frames: int, frame_rate: float | None, sampling: str, rng: random.Random) -> list[int]:
    """The source frame indices a use of ``clip`` takes (``num_frames`` of them, in order)."""
    if sampling not in FRAME_SAMPLING:
        raise ValueError(f"unknown frame_sampling {sampling!r}; valid: {', '.join(FRAME_SAMPLING)}")
    last = clip.frames - 1
    if num_frames == 1:
        return [0 if sampling != "random" else rng.randint(0, last)]
    if sampling == "uniform":
        return [round(i * last / (num_frames - 1)) for i in range(num_frames)]
    step = clip.fps / (frame_rate or clip.fps)  # source frames per output frame
    span = (num_frames - 1) * step
    first = 0 if sampling == "start" else rng.randint(0, max(0, math.floor(last - span + 1e-9)))
    return [min(last, first + round(i * step)) for i in range(num_frames)]


def decode(fp: BinaryIO, clip: Clip, indices: list[int], transform: Callable[[Image.Image], Image.Image]) -> list:
    """The frames at ``indices`` (source frame numbers), each passed through ``transform`` as it is decoded
    (its resize and crop), in order; a frame repeated in ``indices`` is converted once. A clip that ends before
    its header said raises ValueError (the dataset then serves another sample of the bucket, and says so)."""
    av = _av()
    wanted = sorted(set(indices))
    kept: dict[int, Image.Image] = {}
    with av.open(fp) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        base = stream.start_time or 0
        if wanted[0] > 0 and stream.time_base:  # to the keyframe before the window, not through the whole clip
            target = base + int(wanted[0] / clip.fps / stream.time_base)
            container.seek(target, stream=stream, backward=True, any_frame=False)
        counted = None  # frame numbers from the timestamps, or by counting where there are none
        pending = iter(wanted)
        next_wanted = next(pending)
        for frame in container.decode(stream):
            if frame.pts is not None and stream.time_base:
                number = round(float((frame.pts - base) * stream.time_base) * clip.fps)
            else:
                number = 0 if counted is None else counted + 1
            counted = number
            image = None
            # a wanted number the timestamps skipped over (a variable frame rate) takes the next frame shown
            while next_wanted is not None and number >= next_wanted:
                image = image or transform(frame.to_image())
                kept[next_wanted] = image
                next_wanted = next(pending, None)
            if next_wanted is None:
                break
    if len(kept) < len(wanted):
        raise ValueError(f"the clip ended after {counted} frames; its header says {clip.frames}")
    return [kept[i] for i in indices]


def webp_is_animated(head: bytes) -> bool:
    """Whether a WebP's first bytes say it is an animation (the VP8X chunk's animation flag): a still is never
    read whole to find out."""
    return head[12:16] == b"VP8X" and len(head) > 20 and bool(head[20] & 0x02)


def _frame_durations(img: Image.Image) -> list[float]:
    """Each frame's time on screen, in seconds (seeks through every frame)."""
    durations = []
    for index in range(getattr(img, "n_frames", 1)):
        img.seek(index)
        img.load()  # (PIL's WebP reads a frame's duration as it decodes it)
        ms = img.info.get("duration") or 0
        durations.append((ms if ms >= MIN_FRAME_MS else DEFAULT_FRAME_MS) / 1000)
    return durations


def probe_animation(fp: BinaryIO) -> Clip | None:
    """An animated GIF or WebP as a Clip (its frames, at its mean frame rate); None for a still image."""
    with Image.open(fp) as img:
        if getattr(img, "n_frames", 1) < 2:
            return None
        durations = _frame_durations(img)
    return Clip(len(durations) / sum(durations), len(durations))


def decode_animation(fp: BinaryIO, clip: Clip, indices: list[int], transform: Callable[[Image.Image], Image.Image]) -> list:
    """``decode`` for an animated GIF or WebP: for each index, the frame on screen at its time (index / fps)."""
    import bisect
    import itertools

    with Image.open(fp) as img:
        starts = list(itertools.accumulate(_frame_durations(img), initial=0.0))[:-1]
        shown = {i: max(0, bisect.bisect_right(starts, i / clip.fps + 1e-9) - 1) for i in set(indices)}
        converted: dict[int, Image.Image] = {}
        for frame in sorted(set(shown.values())):
            img.seek(frame)
            converted[frame] = transform(img.convert("RGB"))
    return [converted[shown[i]] for i in indices]


def pack_frames(mask, latent_frames: int):
    """A clip's per-frame mask (B, 1, F, H, W) on its latents' frames, as a causal video VAE packs them: latent frame
    0 is frame 0, each later one the mean of its group of (F - 1) / (latent_frames - 1) frames."""
    import torch

    frames = mask.shape[2]
    if frames == latent_frames:
        return mask
    if latent_frames == 1:
        return mask.mean(dim=2, keepdim=True)
    group = (frames - 1) // (latent_frames - 1)
    rest = mask[:, :, 1 : 1 + group * (latent_frames - 1)].unflatten(2, (latent_frames - 1, group)).mean(dim=3)
    return torch.cat([mask[:, :, :1], rest], dim=2)


def mask_on_grid(mask, grid):
    """A loss mask averaged down to the latent grid ``grid`` ((h, w), or (frames, h, w) for a clip's latents): "area",
    so a latent's weight is the share of its pixels (and frames) that train. A still mask (B, 1, H, W) stays 4-D."""
    import torch.nn.functional as F

    if mask.ndim == 5:
        mask = pack_frames(mask, grid[0])
        return mask if mask.shape[-2:] == tuple(grid[-2:]) else F.interpolate(mask, (mask.shape[2], *grid[-2:]), mode="area")
    return mask if mask.shape[-2:] == tuple(grid[-2:]) else F.interpolate(mask, tuple(grid[-2:]), mode="area")
