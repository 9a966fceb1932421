"""Image probing, loading and resizing to a bucket."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
CROP_STYLES = ("center", "random")


def probe(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation, read from the header only."""
    with Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return width, height


def load_rgb(path: str | Path) -> Image.Image:
    """Decode, apply EXIF orientation and convert to RGB (alpha composited on white)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def resize_and_crop(
    img: Image.Image, bucket: tuple[int, int], crop_style: str, rng: random.Random
) -> tuple[Image.Image, tuple[int, int]]:
    """Scale ``img`` to cover ``bucket`` (w, h), then crop to it. Returns (image, crop (top, left)).

    The crop offset is in the resized image's coordinates, which is what SDXL's crop conditioning means.
    """
    bw, bh = bucket
    scale = max(bw / img.width, bh / img.height)
    size = (max(bw, math.ceil(img.width * scale - 1e-6)), max(bh, math.ceil(img.height * scale - 1e-6)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    dx, dy = img.width - bw, img.height - bh
    if crop_style == "center":
        left, top = dx // 2, dy // 2
    elif crop_style == "random":
        left, top = rng.randint(0, dx), rng.randint(0, dy)
    else:
        raise ValueError(f"unknown crop_style {crop_style!r}; valid: {', '.join(CROP_STYLES)}")
    return img.crop((left, top, left + bw, top + bh)), (top, left)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor in [-1, 1], (3, H, W)."""
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
