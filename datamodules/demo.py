"""A small generated image set for the built-in demo and the tests: shapes on plain backgrounds."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
_SHAPES = ("circle", "square")
# Three aspect ratios so the demo exercises more than one bucket.
_SIZES = ((96, 96), (128, 80), (80, 128))


def image_names(count: int = 12) -> list[str]:
    """The demo images' file names, in order: their captions, numbered (``a red circle on white (0).png``)."""
    names = []
    for i in range(count):
        colour = list(_COLOURS)[i % len(_COLOURS)]
        shape = _SHAPES[(i // len(_COLOURS)) % len(_SHAPES)]
        names.append(f"a {colour} {shape} on white ({i}).png")
    return names


def _write_once(path: Path, fill) -> Path:
    """A folder written whole or not at all: ``fill(tmp)`` writes into a temporary sibling, which is renamed to
    ``path``; a folder already there (another process's, a run before) is kept."""
    if path.is_dir() and any(path.iterdir()):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path.is_dir() and any(path.iterdir())):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_images(path: str | os.PathLike, count: int = 12, seed: int = 0) -> Path:
    """Write ``count`` PNGs named by their caption (e.g. ``a red circle on white.png``) atomically."""

    def fill(tmp: Path) -> None:
        rng = random.Random(seed)
        for i, name in enumerate(image_names(count)):
            colour = list(_COLOURS)[i % len(_COLOURS)]
            shape = _SHAPES[(i // len(_COLOURS)) % len(_SHAPES)]
            w, h = _SIZES[i % len(_SIZES)]
            img = Image.new("RGB", (w, h), (250, 250, 250))
            draw = ImageDraw.Draw(img)
            r = rng.randint(min(w, h) // 5, min(w, h) // 3)
            cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
            box = (cx - r, cy - r, cx + r, cy + r)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=_COLOURS[colour])
            img.save(tmp / name)

    return _write_once(Path(path), fill)


def write_references(images: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The edit families' demo pairs: for each demo image (the target), an input image of the same name, the
    target mirrored left to right (the edit: "mirror it back"), written atomically once."""

    def fill(tmp: Path) -> None:
        for target in sorted(Path(images).glob("*.png")):
            with Image.open(target) as img:
                img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp / target.name)

    return _write_once(Path(path), fill)


_MOTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def write_clips(path: str | os.PathLike, count: int = 8, frames: int = 17, fps: int = 8, seed: int = 0) -> Path:
    """The video families' demo: ``count`` MP4 clips of a shape moving across white, named by their caption
    (``a red circle moving right (0).mp4``), and two of the demo's still images beside them, so the demo trains
    on a mixed folder (a still is a 1-frame sample). Needs PyAV (the ``video`` extra); written atomically once."""

    def fill(tmp: Path) -> None:
        import av

        rng = random.Random(seed)
        for i in range(count):
            colour = list(_COLOURS)[i % len(_COLOURS)]
            shape = _SHAPES[(i // len(_COLOURS)) % len(_SHAPES)]
            motion = list(_MOTIONS)[i % len(_MOTIONS)]
            w, h = _SIZES[i % 2]  # square and landscape: two buckets
            r = min(w, h) // 6
            x, y = rng.randint(2 * r, w - 2 * r), rng.randint(2 * r, h - 2 * r)
            dx, dy = _MOTIONS[motion]
            with av.open(str(tmp / f"a {colour} {shape} moving {motion} ({i}).mp4"), "w") as container:
                stream = container.add_stream("mpeg4", rate=fps)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                for f in range(frames):
                    img = Image.new("RGB", (w, h), (250, 250, 250))
                    cx, cy = x + dx * f * (w // 3) // frames, y + dy * f * (h // 3) // frames
                    box = (cx - r, cy - r, cx + r, cy + r)
                    (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(
                        box, fill=_COLOURS[colour]
                    )
                    for packet in stream.encode(av.VideoFrame.from_image(img)):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
        stills = write_images(Path(tmp).parent / "images")
        for name in image_names()[:2]:
            shutil.copyfile(stills / name, tmp / name)

    return _write_once(Path(path), fill)
