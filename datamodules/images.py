"""Image probing, loading and resizing to a bucket."""

from __future__ import annotations

import io
import math
import random
import warnings
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

HEIF_EXTENSIONS = frozenset({".heic", ".heif"})


def _heif_opener() -> bool:
    """Phones' HEIC photos decode when pillow-heif is installed (the ``heic`` extra); not otherwise."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


HEIF_READABLE = _heif_opener()
# GIF (its first frame), BMP, TIFF (its first page) and AVIF decode with Pillow itself.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif"}) | (
    HEIF_EXTENSIONS if HEIF_READABLE else frozenset()
)
# Image formats people do drop into datasets that are not decoded here: listed, so that they show up in
# the report as skipped ("unsupported format") instead of vanishing.
UNSUPPORTED_IMAGES = frozenset({".jxl", ".svg", ".psd", ".dng", ".cr2", ".nef", ".arw"}) | (
    frozenset() if HEIF_READABLE else HEIF_EXTENSIONS
)
COMMON_FORMATS = ("JPEG", "PNG", "WEBP")  # the report notes the format of any other, and the frame used
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
CROP_STYLES = ("center", "random", "corner")
_TAIL = 64 * 1024  # how much of a file's end the truncation check reads


def probe(fp: BinaryIO) -> tuple[int, int, str]:
    """(width, height, note) as displayed, i.e. after EXIF orientation, read from the header only. The
    note names a format other than JPEG/PNG/WebP and, for an animation or a multi-page file, the frame used
    (the first): "GIF, first of 12 frames"; it is empty for the common formats.

    Raises ``Image.DecompressionBombError`` above twice PIL's ``MAX_IMAGE_PIXELS`` (where PIL itself
    refuses; once is only its warning level, and 100 MP photographs are real), before any decoding.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # judged just below, with a reason
        img = Image.open(fp)
    with img:
        width, height = img.size
        limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
        if limit and width * height > limit:
            raise Image.DecompressionBombError(f"decompression bomb: {width}x{height} exceeds {limit} pixels")
        # PIL's PNG getexif() decodes the whole image to look for a late eXIf chunk; a header-only
        # probe reads EXIF only where the header already holds it (JPEG, WebP, a PNG's early eXIf).
        has_exif = img.format != "PNG" or "exif" in img.info
        orientation = img.getexif().get(0x0112, 1) if has_exif else 1
        note = _format_note(img)
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return width, height, note


def _format_note(img: Image.Image) -> str:
    if img.format in COMMON_FORMATS:
        return ""
    frames = getattr(img, "n_frames", 1)
    unit = "pages" if img.format == "TIFF" else "frames"
    return f"{img.format}, first of {frames} {unit}" if frames > 1 else str(img.format)


def truncation(fp: BinaryIO) -> str | None:
    """Why the file looks cut short (a half-written download or copy), or None.

    Reads only the head and the tail. A JPEG must end with an EOI marker (FF D9) within its last
    64 KiB: in entropy-coded data FF is always followed by 00 or a restart marker, so FF D9 cannot
    appear by chance, and cameras' trailers rarely exceed that. A PNG must contain its IEND chunk near
    the end; a WebP must be as long as its RIFF header says. Other formats are checked when decoded.
    """
    head = fp.read(12)
    fp.seek(0, io.SEEK_END)
    size = fp.tell()
    fp.seek(max(0, size - _TAIL))
    tail = fp.read()
    fp.seek(0)
    if head.startswith(b"\xff\xd8"):
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(b"\x89PNG"):
        return None if b"IEND" in tail[-1024:] else "truncated PNG (no IEND chunk)"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8
        return None if size >= declared else f"truncated WebP ({size} of {declared} bytes)"
    return None


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale (modes I;16*, I, F) scaled to 8 bits, not clipped to white."""
    array = np.asarray(img, dtype=np.float64)
    peak = 65535.0 if img.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(array * (255.0 / peak)), 0, 255).astype(np.uint8), mode="L")


def load_rgb(fp: BinaryIO, cover: tuple[int, int] | None = None) -> Image.Image:
    """Decode, apply EXIF orientation and convert to RGB.

    Alpha is composited on white; CMYK, palette and grayscale are converted; 16-bit is scaled.
    ``cover`` (w, h, as displayed) is the smallest size the image will be resized to cover: a JPEG is
    then decoded at 1/2, 1/4 or 1/8 scale (PIL's draft mode) when that still covers it, which is
    several times faster than decoding every pixel only to throw most away.
    """
    with Image.open(fp) as img:
        img.seek(0)  # an animation's or a multi-page file's first frame
        if cover is not None and img.format == "JPEG":
            bw, bh = cover
            if img.getexif().get(0x0112, 1) in _TRANSPOSED_ORIENTATIONS:
                bw, bh = bh, bw
            displayed_w, displayed_h = img.size
            scale = max(bw / displayed_w, bh / displayed_h)
            img.draft("RGB", (math.ceil(displayed_w * scale), math.ceil(displayed_h * scale)))
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I") or img.mode == "F":
            img = _to_8bit(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def resize_and_crop(
    img: Image.Image,
    bucket: tuple[int, int],
    crop_style: str,
    rng: random.Random,
    crop: bool = True,
    scale_to: tuple[int, int] | None = None,
    at: tuple[int, int] | None = None,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> tuple[Image.Image, tuple[int, int]]:
    """Scale ``img`` to cover ``bucket`` (w, h), then crop to it. Returns (image, crop (top, left)).

    ``crop_style``: ``center``, ``random`` or ``corner`` (top-left). With ``crop`` off the image is
    resized to the bucket exactly, its aspect bent by the bucket's rounding. ``scale_to`` (w, h) resizes
    to that size instead, when it is larger than the cover, so the crop is a detail of the image
    (``maximum_image_size``/``target_downsample_size``). The crop offset is in the resized image's
    coordinates, which is what SDXL's crop conditioning means.

    ``at`` (top, left) crops there instead of by ``crop_style``: a companion image (a mask, a control image)
    takes its target's crop box. A mask is resized with ``resample=NEAREST``, so its edges stay hard.
    """
    bw, bh = bucket
    if not crop:
        return (img if img.size == bucket else img.resize(bucket, resample)), (0, 0)
    scale = max(bw / img.width, bh / img.height)
    if scale_to is not None:
        scale = max(scale, scale_to[0] / img.width)
    size = (max(bw, math.ceil(img.width * scale - 1e-6)), max(bh, math.ceil(img.height * scale - 1e-6)))
    if size != img.size:
        img = img.resize(size, resample)
    dx, dy = img.width - bw, img.height - bh
    if at is not None:
        top, left = at
    elif crop_style == "center":
        left, top = dx // 2, dy // 2
    elif crop_style == "random":
        left, top = rng.randint(0, dx), rng.randint(0, dy)
    elif crop_style == "corner":
        left, top = 0, 0
    else:
        raise ValueError(f"unknown crop_style {crop_style!r}; valid: {', '.join(CROP_STYLES)}")
    return img.crop((left, top, left + bw, top + bh)), (top, left)


def load_mask(fp: BinaryIO, from_alpha: bool = False) -> Image.Image:
    """A loss mask as a grayscale image (white = train, black = ignore; grey weighs in between), after EXIF
    orientation: the file's luminance, or with ``from_alpha`` its alpha channel (opaque = train), as kohya's
    and ai-toolkit's alpha masks are. An image without alpha is all opaque: all of it trains."""
    with Image.open(fp) as img:
        img.seek(0)
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I") or img.mode == "F":
            img = _to_8bit(img)
        if not from_alpha:
            return img.convert("L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            return img.convert("RGBA").getchannel("A")
        return Image.new("L", img.size, 255)


def mask_tensor(img: Image.Image) -> torch.Tensor:
    """Grayscale mask -> float tensor in [0, 1], (1, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None].contiguous()


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor in [-1, 1], (3, H, W)."""
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
