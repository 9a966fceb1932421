"""The learning benchmark's toy sets (bench/learn.py): what a family is trained on and scored against.

- **The caption task**: a faint square in one of four quadrants of a grey-blue image, captioned with its quadrant.
- **The edit task**: pairs whose target shows the square on the other side of its reference (one instruction).
- **The motion task** (video families): a faint square crossing a clip, captioned with its direction of motion.
- **Generic shapes**: what a LoRA's base is pretrained on, captioned with their most common colour.
"""

from __future__ import annotations

from pathlib import Path

SIZE = 64  # px, the toy images' side (a recipe may choose another: ``Recipe.size``)
CLASSES = ("top left", "top right", "bottom left", "bottom right")
SQUARE = 24  # px at SIZE, centred in its quadrant (scaled with the side)
# A faint square. The text decides the class only at noise levels where the noisy image does not give it
# away, i.e. while (signal / noise)^2 * |difference of two classes|^2 < ~1. A bold square (yellow on blue:
# ~1350 between classes in SD3's unit-variance latents) gives itself away at every level but sigma > 0.97,
# so only ~1% of training draws taught the text, and it was learned after ~4000 steps. At +20 levels the
# difference is ~15 in the latents: the text decides the upper half of the schedule. Pixels carry ~5x the
# latents' difference at the same contrast (every pixel of the square counts), so pixel families get a
# fainter square, +9 levels (a difference of ~17).
BACKGROUND = (90, 100, 140)
CONTRAST = {"latent": 20, "pixel": 9}  # levels the square is above the background at SIZE, in every channel
# (at another side, scaled by SIZE / side: the square's area goes with the side squared, so the squared
# difference between two classes, which decides where the text is needed, stays the same)
JITTER_PX, JITTER_LEVELS = 3, 2  # per image: the square moves (at SIZE) and its shade changes by up to this much


# The edit task (bench/learn.py's docstring): one instruction for every pair; the class's target shows the square in
# quadrant ``label``, its reference in quadrant ``EDIT_SOURCE[label]`` (the other side: a horizontal offset of half
# the image, which rotary positions express for every token alike).
EDIT_CAPTION = "move the square to the other side"
EDIT_SOURCE = (1, 0, 3, 2)


def caption(label: int) -> str:
    # The class words come first: a causal text encoder (CLIP) carries a difference only to the tokens
    # after it, and a tiny random one carries little of it into the padding, so "a square at the top left"
    # and "... top right" left 5 of 77 tokens apart and the denoiser never found them.
    return f"{CLASSES[label]} square"


def contrast_for(family: str, size: int = SIZE) -> int:
    from tuner.config.families import family_class

    return round(CONTRAST["latent" if family_class(family).latent_space else "pixel"] * SIZE / size)


def class_image(label: int, contrast: int, size: int = SIZE, dx: int = 0, dy: int = 0, shade: int = 0):
    """The class's image (PIL, ``size`` square): its square ``contrast`` (+ ``shade``) levels above the
    background, moved by (dx, dy)."""
    from PIL import Image, ImageDraw

    colour = tuple(c + contrast + shade for c in BACKGROUND)
    img = Image.new("RGB", (size, size), BACKGROUND)
    row, col = divmod(label, 2)
    square = SQUARE * size // SIZE
    x0 = col * size // 2 + (size // 2 - square) // 2 + dx
    y0 = row * size // 2 + (size // 2 - square) // 2 + dy
    ImageDraw.Draw(img).rectangle((x0, y0, x0 + square - 1, y0 + square - 1), fill=colour)
    return img


def jittered(size: int, per_class: int, seed: int):
    """(label, i, dx, dy, shade) for ``per_class`` images of each class: the square moved by a few pixels and its
    shade by a level or two (so a set is not four repeated images), one seeded draw after another."""
    import random

    rng = random.Random(seed)
    jitter = max(1, JITTER_PX * size // SIZE)
    for label in range(len(CLASSES)):
        for i in range(per_class):
            dx, dy = rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)
            yield label, i, dx, dy, rng.randint(-JITTER_LEVELS, JITTER_LEVELS)


def write_toy_set(path: Path, contrast: int, size: int = SIZE, per_class: int = 8, seed: int = 0) -> Path:
    """``per_class`` jittered images of each class, captioned by file name."""
    if path.is_dir() and any(path.iterdir()):
        return path
    path.mkdir(parents=True, exist_ok=True)
    for label, i, dx, dy, shade in jittered(size, per_class, seed):
        class_image(label, contrast, size, dx, dy, shade).save(path / f"{caption(label)} ({i}).png")
    return path


def write_edit_set(path: Path, contrast: int, size: int = SIZE, per_class: int = 8, seed: int = 0) -> Path:
    """The edit task's pairs: ``path/targets`` and ``path/references``, the same file names (each captioned
    ``EDIT_CAPTION``); a pair's square jittered and shaded alike, the reference's on the other side."""
    targets, references = path / "targets", path / "references"
    if targets.is_dir() and any(targets.iterdir()):
        return path
    targets.mkdir(parents=True, exist_ok=True)
    references.mkdir(parents=True, exist_ok=True)
    for label, i, dx, dy, shade in jittered(size, per_class, seed):
        name = f"{EDIT_CAPTION} ({label * per_class + i}).png"
        class_image(label, contrast, size, dx, dy, shade).save(targets / name)
        class_image(EDIT_SOURCE[label], contrast, size, dx, dy, shade).save(references / name)
    return path


def templates(contrast: int, size: int = SIZE):
    """The four classes' clean images, (4, size, size, 3) floats in [0, 1]."""
    import numpy as np

    return np.stack([np.asarray(class_image(label, contrast, size), dtype=np.float32) / 255
                     for label in range(len(CLASSES))])


def nearest_class(images, refs) -> list[int]:
    """Each image's (or clip's) nearest class template (mean squared distance in pixels)."""
    import numpy as np

    d = ((images[:, None] - refs[None]) ** 2)
    d = d.mean(axis=tuple(range(2, d.ndim)))
    return [int(i) for i in np.argmin(d, axis=1)]


PALETTE = {"black": (0, 0, 0), "white": (1, 1, 1), "red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1),
           "yellow": (1, 1, 0), "cyan": (0, 1, 1), "magenta": (1, 0, 1)}


def colour_name(rgb) -> str:
    """The nearest of the palette's colours to ``rgb`` (floats in [0, 1])."""
    return min(PALETTE, key=lambda name: sum((a - b) ** 2 for a, b in zip(PALETTE[name], rgb, strict=True)))


def write_generic_set(path: Path, size: int = SIZE, count: int = 64, seed: int = 1) -> Path:
    """Generic shapes of every colour (models.learnable.toy_images), captioned with the name of their most
    common colour ("red background (3).png"): what the LoRA's base learns to draw, from text, before it sees
    the toy set. The captions matter: a base trained on one caption for all had no use for its text, and a
    LoRA on it did not learn the quadrants (SD 1.5: 0.50)."""
    import numpy as np
    import torch
    from PIL import Image

    from models.learnable import toy_images

    if path.is_dir() and any(path.iterdir()):
        return path
    path.mkdir(parents=True, exist_ok=True)
    images = toy_images(count, size, torch.Generator().manual_seed(seed))
    for i, image in enumerate(images):
        pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        name = colour_name((colours[counts.argmax()] / 255).tolist())  # its most common colour
        Image.fromarray(pixels).save(path / f"{name} background ({i}).png")
    return path


def write_generic_clips(path: Path, size: int = SIZE, count: int = 64, seed: int = 1) -> Path:
    """The generic set as clips, for a video family's LoRA base (the motion task): each generic image drifting
    ``MOTION_FRAMES`` frames at a random velocity (up to ``MOTION_STEP`` px a frame on each axis, wrapping around),
    captioned with its colour as the images are, never with a direction: the base learns that clips move, the LoRA
    which way a caption says. Lossless FFV1, as the motion set."""
    import random

    import av
    import numpy as np
    from PIL import Image

    if path.is_dir() and any(path.iterdir()):
        return path
    images = write_generic_set(path.with_name(path.name + "-frames"), size, count, seed)
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    step = MOTION_STEP * size // SIZE
    for file in sorted(images.glob("*.png")):
        pixels = np.asarray(Image.open(file).convert("RGB"))
        vx, vy = rng.randint(-step, step), rng.randint(-step, step)
        with av.open(str(path / f"{file.stem}.mkv"), "w") as container:
            stream = container.add_stream("ffv1", rate=MOTION_FPS)
            stream.width, stream.height, stream.pix_fmt = size, size, "bgr0"
            for t in range(MOTION_FRAMES):
                frame = np.roll(pixels, (vy * t, vx * t), axis=(0, 1))
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            container.mux(stream.encode())
    return path


def low_res(label: int, factor: int, contrast: int, size: int = SIZE):
    """The class image downsampled as IF stage II's training downsamples its target, in [-1, 1]."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    image = np.asarray(class_image(label, contrast, size), dtype=np.float32)
    x = torch.from_numpy(image / 127.5 - 1).permute(2, 0, 1)[None]
    return F.interpolate(x, (size // factor, size // factor), mode="bilinear", antialias=True, align_corners=False)


# The motion task: a faint square crosses a clip in one of four directions, its path centred on the image (jittered a
# few pixels), captioned with its direction. Over the upper part of the noise schedule the noisy clip does not give
# the direction away: the caption must. Scored as the caption task is, by the nearest class clip (every frame).
# A square placed at random with only its direction to learn (scored by its centroid's shift) asked the tiny
# denoisers to break the symmetry of noise on their own: Wan and LTX-Video sampled noise, no square (0.25-0.31).
# The step is 4 px a frame: a Wan latent frame (4 frames) moves a 16 px token.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOTION_FRAMES, MOTION_FPS, MOTION_STEP, MOTION_SQUARE = 9, 8, 4, 16  # frames, fps, px a frame, px a side (at SIZE)


def motion_caption(label: int) -> str:
    return f"{list(DIRECTIONS)[label]} moving square"  # the class word first, as ``caption``


def motion_frames(label: int, contrast: int, size: int = SIZE, dx: int = 0, dy: int = 0, shade: int = 0) -> list:
    """The class's clip (PIL frames): the square moving ``MOTION_STEP`` px a frame (scaled with the side) in its
    direction, its path centred on the image, moved by (dx, dy)."""
    from PIL import Image, ImageDraw

    ux, uy = list(DIRECTIONS.values())[label]
    step, square = MOTION_STEP * size // SIZE, MOTION_SQUARE * size // SIZE
    colour = tuple(c + contrast + shade for c in BACKGROUND)
    frames = []
    for t in range(MOTION_FRAMES):
        offset = (t - (MOTION_FRAMES - 1) / 2) * step
        x0, y0 = round((size - square) / 2 + ux * offset) + dx, round((size - square) / 2 + uy * offset) + dy
        img = Image.new("RGB", (size, size), BACKGROUND)
        ImageDraw.Draw(img).rectangle((x0, y0, x0 + square - 1, y0 + square - 1), fill=colour)
        frames.append(img)
    return frames


def write_motion_set(path: Path, contrast: int, size: int = SIZE, per_class: int = 8, seed: int = 0) -> Path:
    """``per_class`` jittered clips of each class, lossless (FFV1 in Matroska: a faint square survives), captioned by
    file name."""
    import av

    if path.is_dir() and any(path.iterdir()):
        return path
    path.mkdir(parents=True, exist_ok=True)
    for label, i, dx, dy, shade in jittered(size, per_class, seed):
        with av.open(str(path / f"{motion_caption(label)} ({i}).mkv"), "w") as container:
            stream = container.add_stream("ffv1", rate=MOTION_FPS)
            stream.width, stream.height, stream.pix_fmt = size, size, "bgr0"
            for frame in motion_frames(label, contrast, size, dx, dy, shade):
                container.mux(stream.encode(av.VideoFrame.from_image(frame)))
            container.mux(stream.encode())
    return path


def motion_templates(contrast: int, size: int = SIZE):
    """The four classes' clean clips, (4, F, size, size, 3) floats in [0, 1]."""
    import numpy as np

    return np.stack([np.stack([np.asarray(f, dtype=np.float32) / 255 for f in motion_frames(label, contrast, size)])
                     for label in range(len(DIRECTIONS))])
