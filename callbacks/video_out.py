"""Validation clips of a video family: written as an ``.mp4`` (H.264 where this FFmpeg has it, else MPEG-4
part 2), or an animated ``.webp`` without PyAV; and a frame strip, the still that grids, the webhook and the
model card show."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

STRIP_FRAMES = 5  # frames a strip shows, evenly spaced over the clip


def frame_strip(frames: list[Image.Image], count: int = STRIP_FRAMES) -> Image.Image:
    """Up to ``count`` frames, evenly spaced from the first to the last, side by side."""
    picked = [frames[round(i * (len(frames) - 1) / max(1, count - 1))] for i in range(min(count, len(frames)))]
    w, h = picked[0].size
    strip = Image.new("RGB", (w * len(picked), h), "white")
    for i, frame in enumerate(picked):
        strip.paste(frame.convert("RGB"), (i * w, 0))
    return strip


def write_clip(frames: list[Image.Image], stem: Path, fps: float) -> Path:
    """``frames`` as ``<stem>.mp4`` (or ``<stem>.webp`` when PyAV is missing); returns the path written."""
    try:
        import av
    except ImportError:
        path = stem.with_suffix(".webp")
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0, lossless=True)
        return path
    path = stem.with_suffix(".mp4")
    w, h = frames[0].size
    even = (w % 2 == 0) and (h % 2 == 0)  # H.264 in yuv420p needs even sides
    codec = "libx264" if even and "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        for frame in frames:
            image = frame.convert("RGB").crop((0, 0, stream.width, stream.height))
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def log_clip(
    logger, tag: str, clip: Path, frames: list[Image.Image], fps: float, step: int, strip: Image.Image
) -> None:
    """One clip to wandb (the file ``clip`` written) or TensorBoard (a video where moviepy is installed, else the
    frame strip)."""
    import numpy as np

    if hasattr(logger, "log_video"):  # Lightning's WandbLogger: the file written (an array would need moviepy)
        logger.log_video(tag, [str(clip)], step=step)
        return
    video = np.stack([np.asarray(f.convert("RGB")) for f in frames]).transpose(0, 3, 1, 2)  # (T, C, H, W) uint8
    writer = getattr(logger, "experiment", None)
    if not hasattr(writer, "add_image"):
        return
    # torch's add_video makes its GIF with moviepy, and without it only prints a line and logs nothing
    if hasattr(writer, "add_video") and importlib.util.find_spec("moviepy") is not None:
        writer.add_video(tag, video[None], step, fps=round(fps))
    else:
        writer.add_image(tag, np.asarray(strip), step, dataformats="HWC")
