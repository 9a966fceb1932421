"""The metadata scan: every item of a source probed once (header, EXIF size, truncation), then
captioned and bucketed from the config.

Only the probe is cached, per dataset, keyed by each item's key and version (path + mtime + size,
or an ETag): a re-run over unchanged files reads no image, and a changed file is probed again. Captions
and buckets are recomputed from the current config on every scan (they are cheap), so a changed config
can never be served from a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from datamodules.buckets import bucket_for
from datamodules.captions import caption_for
from datamodules.images import HEIF_EXTENSIONS, UNSUPPORTED_IMAGES, probe, truncation
from datamodules.sources import Item, Source
from datamodules.video import VIDEO_EXTENSIONS, Clip, shortfall, webp_is_animated

log = logging.getLogger(__name__)

DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, UnicodeError)
_CACHE_FORMAT = 3  # 2: entries carry the format note; 3: an animated GIF or WebP carries its fps and frames


@dataclass(frozen=True)
class Sample:
    item: Item
    width: int  # after EXIF orientation
    height: int
    bucket: tuple[int, int]  # (w, h)
    captions: tuple[str, ...]  # one is drawn per use when a sidecar has several lines
    dataset: str
    crop_style: str
    crop: bool = True
    regularisation: bool = False  # prior-preservation data, weighted by model.prior_loss_weight
    scale_to: tuple[int, int] | None = None  # a large image's size before its crop (detail crops)
    note: str = ""  # a format other than JPEG/PNG/WebP, and the frame used: "GIF, first of 12 frames"
    companions: tuple = ()  # paired data (datamodules/pairs.py Companion): references, mask, control
    mask_from_alpha: bool = False  # the loss mask is the image's own alpha channel
    clip: Clip | None = None  # a video clip's frame rate and count (datamodules/video.py); None: an image
    num_frames: int = 1  # frames a use yields: data.num_frames for a clip, 1 for an image
    frame_rate: float | None = None
    frame_sampling: str = "start"

    @property
    def caption(self) -> str:
        return self.captions[0]

    @property
    def group(self) -> tuple:
        """What a batch shares: the bucket, or with references that keep buckets of their own or several
        frames, (bucket, their buckets[, frames])."""
        own = tuple(c.bucket for c in self.companions if c.bucket is not None)
        if self.num_frames > 1:  # clips batch with clips of their frame count
            return self.bucket, own, self.num_frames
        return (self.bucket, own) if own else self.bucket


def _area(value: float) -> float:
    """A size in resolution units as pixels of area: megapixels below 16, else an edge squared."""
    return value * 1e6 if value < 16 else value**2


def downsample_size(width: int, height: int, spec: dict) -> tuple[int, int] | None:
    """The size a larger-than-``maximum_image_size`` image is brought to before cropping, or None.

    Both sizes are in the dataset's resolution units: the shorter edge for ``pixel``, an area (edge or
    megapixels) for ``area``. The crop is then a bucket-sized detail of the downsampled image.
    """
    limit, target = spec.get("maximum_image_size"), spec.get("target_downsample_size")
    if not limit or not target:
        return None
    if spec["resolution_type"] == "pixel":
        if min(width, height) <= limit:
            return None
        scale = target / min(width, height)
    else:
        if width * height <= _area(limit):
            return None
        scale = (_area(target) / (width * height)) ** 0.5
    return round(width * scale), round(height * scale)


@dataclass
class ScanResult:
    usable: list[Sample]
    skipped: list[dict]  # {path, reason}
    caption_fallbacks: int  # textfile/column datasets where the file name had to serve
    probed: int  # images actually read this time (not served from the probe cache)
    pairs: dict = field(default_factory=dict)  # companion kind -> datamodules.pairs.PairReport


def probe_item(source: Source, item: Item) -> tuple[tuple[int, int, str] | str, bool]:
    """((width, height) after EXIF orientation, or why the image is unusable; whether to remember it).

    Verdicts on the bytes (empty, truncated, not an image, a bomb) are remembered with the item's
    version. A failure to get the bytes at all (a download, an S3 GET, a permission) may pass, so it
    is reported this time and tried again next time.
    """
    if item.size == 0:
        return "empty file", True
    suffix = PurePosixPath(item.key).suffix.lower()
    if suffix in HEIF_EXTENSIONS and suffix in UNSUPPORTED_IMAGES:
        return f"unsupported format ({suffix}) without pillow-heif: pip install -e \".[heic]\", or convert it", True
    if suffix in UNSUPPORTED_IMAGES:
        return f"unsupported format ({suffix}); convert it to PNG, JPEG or WebP", True
    if suffix in VIDEO_EXTENSIONS:
        return probe_video(source, item)
    try:
        fp = source.open_header(item)
    except OSError as err:
        return f"unreadable image: {err}", False
    try:
        with fp:
            cut = truncation(fp)
            if cut:
                return cut, True
            size = probe(fp)
            fp.seek(0)
            animated = suffix == ".gif" or (suffix == ".webp" and webp_is_animated(fp.read(32)))
        return (probe_animation_item(source, item, size) if animated else size), True
    except Image.DecompressionBombError as err:
        return str(err), True  # refused on its header alone: decoding it would need gigabytes
    except DECODE_ERRORS as err:
        return f"unreadable image: {err}", True


def probe_animation_item(source: Source, item: Item, size: tuple[int, int, str]) -> tuple:
    """An image that may be animated (GIF, an animated WebP): a clip's (width, height, note, fps, frames) when it
    is, else its image probe ``size``. A video family trains on it as a clip; the others take its first frame."""
    from datamodules.video import probe_animation

    with source.open(item) as fp:
        clip = probe_animation(fp)
    if clip is None:
        return size
    return (*size, clip.fps, clip.frames)  # the image's note ("GIF, first of 12 frames"): what an image family takes


def probe_video(source: Source, item: Item) -> tuple[tuple | str, bool]:
    """A clip's (width, height, note, fps, frames), or why it is unusable; PyAV missing is not remembered (an
    install fixes it)."""
    from datamodules.video import probe_clip

    try:
        with source.open(item) as fp:
            width, height, clip = probe_clip(fp)
    except OSError as err:
        return f"unreadable video: {err}", "PyAV" not in str(err)
    except Exception as err:  # noqa: BLE001 - FFmpeg's own errors (av.error.*) for a damaged or unknown container
        return f"unreadable video: {err}", True
    note = f"video, {clip.frames} frames at {clip.fps:g} fps ({clip.duration:.2f} s)"
    return (width, height, note, clip.fps, clip.frames), True


class ProbeCache:
    """``{item key: [version, width, height, reason, note]}`` in ``<cache_dir>/scan/<source hash>.json``."""

    def __init__(self, cache_dir: str | None, source: Source, tag: str = ""):
        self.path = None
        self.entries: dict[str, list] = {}
        self.identity = source.identity() + tag  # a tag keeps a table's companion column apart from its images
        if cache_dir:
            digest = hashlib.sha256(self.identity.encode()).hexdigest()[:16]
            self.path = Path(cache_dir) / "scan" / f"{digest}.json"
            try:
                saved = json.loads(self.path.read_text())
                if saved.get("format") == _CACHE_FORMAT and saved.get("source") == self.identity:
                    self.entries = saved["entries"]
            except (OSError, ValueError, KeyError):
                self.entries = {}  # missing or damaged: probe everything again

    def get(self, item: Item) -> tuple[int, int, str] | str | None:
        hit = self.entries.get(item.key)
        if not hit or hit[0] != item.version:
            return None
        return hit[3] if hit[3] else (hit[1], hit[2], hit[4], *hit[5:])  # a clip's fps and frames follow

    def save(self, results: dict[str, tuple[Item, tuple[int, int, str] | str, bool]]) -> None:
        """Remember the verdicts marked to keep (not passing failures to fetch the bytes)."""
        if self.path is None:
            return
        entries = {
            key: [
                item.version,
                *(result[:2] if isinstance(result, tuple) else (0, 0)),
                None if isinstance(result, tuple) else result,
                result[2] if isinstance(result, tuple) else "",
                *(result[3:] if isinstance(result, tuple) else ()),
            ]
            for key, (item, result, keep) in results.items()
            if keep
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": _CACHE_FORMAT, "source": self.identity, "entries": entries}))
        os.replace(tmp, self.path)


def _fetch_sidecar(source: Source, item: Item) -> bytes | None | Exception:
    try:
        return source.sidecar(item)
    except (OSError, UnicodeError) as err:  # reported with the image, not raised from the thread
        return err


def _animation(item: Item, note: str, clip: list, video: bool) -> tuple[str, list]:
    """An animated GIF or WebP: a clip with its own note for a video family, its first frame (no clip) for the others."""
    if not clip or PurePosixPath(item.key).suffix.lower() in VIDEO_EXTENSIONS:
        return note, clip
    if not video:
        return note, []
    return f"animation, {clip[1]} frames at {clip[0]:.3g} fps ({clip[1] / clip[0]:.2f} s)", clip


def scan_source(
    name: str,
    spec: dict,
    source: Source,
    cache_dir: str | None = None,
    companions: dict[str, Source] | None = None,
    own_bucket: bool = False,
    video: bool = False,
) -> ScanResult:
    """Probe (or recall) every item, then caption and bucket the usable ones by ``spec``; with
    ``companions`` (datamodules/pairs.py), pair each with its companion images, whose sources these are.
    ``video``: the family trains on clips (otherwise a clip is skipped, with the reason)."""
    items = list(source.items())
    results, sidecars, probed = _probe_all(source, items, cache_dir, spec["caption_strategy"] == "textfile")
    usable, skipped, fallbacks = [], [], 0
    for item in items:
        result = results[item.key][1]
        if isinstance(result, str):
            skipped.append({"path": item.location, "reason": result})
            continue
        width, height, note, *clip = result
        note, clip = _animation(item, note, clip, video)
        if clip:
            why = _clip_problem(spec, Clip(*clip), video)
            if why:
                skipped.append({"path": item.location, "reason": why})
                continue
        if min(width, height) < spec["minimum_image_size"]:
            reason = f"too small: {width}x{height} < minimum_image_size={spec['minimum_image_size']}"
            skipped.append({"path": item.location, "reason": reason})
            continue
        try:
            sidecar = sidecars.get(item.key)
            if isinstance(sidecar, Exception):
                raise sidecar
            captions, fell_back = caption_for(
                PurePosixPath(item.key),
                spec["caption_strategy"],
                spec["instance_prompt"],
                sidecar,
                item.caption,
                spec["multiline_captions"],
            )
        except (OSError, UnicodeError) as err:
            skipped.append({"path": item.location, "reason": f"unreadable caption: {err}"})
            continue
        fallbacks += fell_back
        usable.append(_sample(name, spec, item, width, height, captions, note, Clip(*clip) if clip else None))
    reports = {}
    if companions:
        from datamodules.pairs import pair

        def probe(src: Source, wanted: list[Item]) -> dict:
            found = _probe_all(src, wanted, cache_dir, False, tag=":companions")[0]
            return {key: result for key, (_, result, _) in found.items()}

        usable, reports = pair(name, spec, usable, skipped, companions, own_bucket, probe)
    return ScanResult(usable, skipped, fallbacks, probed, reports)


def _probe_all(source: Source, items: list[Item], cache_dir: str | None, with_sidecars: bool, tag: str = ""):
    """Every item's probe result (recalled from the probe cache, or probed now), and the caption
    sidecars of the usable ones when asked; with the number probed now."""
    cache = ProbeCache(cache_dir, source, tag)
    results: dict[str, tuple[Item, tuple[int, int, str] | str, bool]] = {}
    todo = []
    for item in items:
        hit = cache.get(item)
        if hit is None:
            todo.append(item)
        else:
            results[item.key] = (item, hit, True)
    # Threads: a remote source waits on the network; local probes are short and release the GIL in I/O.
    sidecars: dict[str, bytes | None | Exception] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for item, (result, keep) in zip(todo, pool.map(lambda it: probe_item(source, it), todo), strict=True):
            results[item.key] = (item, result, keep)
        if with_sidecars:
            wanted = [it for it in items if isinstance(results[it.key][1], tuple)]
            for item, raw in zip(wanted, pool.map(lambda it: _fetch_sidecar(source, it), wanted), strict=True):
                sidecars[item.key] = raw
    cache.save(results)
    return results, sidecars, len(todo)


def spec_bucket(width: int, height: int, spec: dict) -> tuple[int, int]:
    """The bucket a dataset's settings give an image of this size."""
    keys = ("resolution", "resolution_type", "bucket_step", "crop_aspect", "crop_aspect_buckets")
    return bucket_for(width, height, *(spec[k] for k in keys))


def _clip_problem(spec: dict, clip: Clip, video: bool) -> str | None:
    """Why a clip cannot serve this dataset (None: it can)."""
    if not video:
        return "a video clip, and this model trains on images (video families: see the README's Video section)"
    if not spec["num_frames"]:
        return "a video clip, and data.num_frames is not set (the frames a sample takes, e.g. 81 for Wan)"
    return shortfall(clip, spec["num_frames"], spec["frame_rate"], spec["frame_sampling"])


def _sample(name: str, spec: dict, item: Item, width: int, height: int, captions, note: str = "", clip=None) -> Sample:
    return Sample(
        item,
        width,
        height,
        spec_bucket(width, height, spec),
        captions,
        name,
        spec["crop_style"],
        spec["crop"],
        spec["is_regularisation_data"],
        downsample_size(width, height, spec),
        note,
        mask_from_alpha=spec["mask_from_alpha"],
        clip=clip,
        num_frames=spec["num_frames"] if clip is not None else 1,
        frame_rate=spec["frame_rate"],
        frame_sampling=spec["frame_sampling"],
    )
