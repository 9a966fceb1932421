"""Paired data: the companion images of each training image (``conditioning.<kind>``: ``reference``, ``mask``,
``control``), found, probed and checked in the scan.

A companion is matched to its target by relative path and stem (``sub/cat.jpg`` takes ``<path>/sub/cat.png``
or any other image extension), as SimpleTuner's conditioning datasets and ai-toolkit's ``control_path`` pair
them; a table source may name it in a column instead. A target with no usable companion is skipped with the
reason; a companion with no target is listed in the report. Nothing is dropped silently.

Companions are resized and cropped with their target's bucket and crop box (datamodules/dataset.py), except a
reference the family lets keep its own aspect ratio (Kontext): it gets a bucket of its own here, and a batch
then holds one (target bucket, reference buckets) group (``Sample.group``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from datamodules.scan import spec_bucket
from datamodules.sources import Item, Source, SourceError, open_source
from datamodules.spec import CONDITIONING_KINDS
from datamodules.video import Clip


@dataclass(frozen=True)
class Companion:
    kind: str  # reference | mask | control
    slot: int  # which of the kind's paths or columns (several references per target)
    source: str  # the data module's key of the source that opens it
    item: Item
    width: int
    height: int
    bucket: tuple[int, int] | None = None  # its own (w, h) bucket; None: its target's bucket and crop box
    clip: Clip | None = None  # a mask or control clip of a clip target: the target's frames are taken from it


@dataclass
class PairReport:
    """What the scan found of one kind of companion in one dataset, for dataset_report.json."""

    pairs: int = 0
    missing: list[dict] = dataclasses.field(default_factory=list)  # targets without a usable companion
    orphans: list[dict] = dataclasses.field(default_factory=list)  # companions without a target

    def as_dict(self) -> dict:
        return {"pairs": self.pairs, "targets_without": self.missing, "companions_without_target": self.orphans}


def companion_entry(companion: Companion) -> dict:
    """A companion as the report lists it beside its target."""
    own = {"bucket": list(companion.bucket)} if companion.bucket is not None else {}
    if companion.clip is not None:  # a mask or control clip: what its target's window is taken from
        own["clip"] = {"fps": companion.clip.fps, "frames": companion.clip.frames}
    return {"kind": companion.kind, "path": companion.item.location, **own}


def as_list(value) -> list[str]:
    """A ``path``/``column`` setting as a list (one entry per slot)."""
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, Sequence) and not isinstance(value, str) else [str(value)]


def slots(spec: dict) -> list[tuple[str, int, str, str]]:
    """``(kind, slot, "path" | "column", value)`` for every companion a dataset's ``conditioning`` names."""
    out = []
    for kind in CONDITIONING_KINDS:
        keys = (spec.get("conditioning") or {}).get(kind) or {}
        for by in ("path", "column"):
            out += [(kind, i, by, v) for i, v in enumerate(as_list(keys.get(by)))]
    return out


def stem(key: str) -> str:
    """``sub/cat.jpg`` -> ``sub/cat``: what pairs a companion with its target."""
    return str(PurePosixPath(key).with_suffix(""))


def open_companion_sources(name: str, spec: dict, target: Source, options: dict) -> dict[str, Source]:
    """The source of each companion slot of dataset ``name``, keyed as ``Companion.source``: a folder, S3
    prefix or shards of its own; a column is read through the target's table."""
    sources = {}
    for kind, slot, by, value in slots(spec):
        key = f"{name}/{kind}/{slot}"
        if by == "column":
            if target.kind != "table":
                raise SourceError(
                    f"data.conditioning.{kind}.column={value!r} needs a table source; dataset {name!r} is "
                    f"{target.kind}: use conditioning.{kind}.path"
                )
            sources[key] = target
        else:
            sources[key] = open_source(value, None, options)
    return sources


def pair(
    name: str, spec: dict, samples: list, skipped: list[dict], sources: dict[str, Source], own_bucket: bool, probe
) -> tuple[list, dict[str, PairReport]]:
    """``samples`` with their companions attached; targets lacking one go to ``skipped`` with the reason.

    ``probe(source, items) -> {key: (w, h, note) | reason}`` probes (or recalls) companions as the scan does
    its images. ``own_bucket``: a reference of another aspect ratio keeps its own bucket (the family allows it).
    """
    reports: dict[str, PairReport] = {}
    found: dict[int, list[Companion]] = {i: [] for i in range(len(samples))}
    lacking: dict[int, str] = {}
    for kind, slot, by, value in slots(spec):
        report = reports.setdefault(kind if slot == 0 else f"{kind}_{slot}", PairReport())
        key = f"{name}/{kind}/{slot}"
        source = sources[key]
        if by == "column":
            wanted = {i: source.companion(s.item, value) for i, s in enumerate(samples)}
            orphans: list[dict] = []
        else:
            wanted, orphans = _match_by_stem(source, samples)
        results = probe(source, [it for it in wanted.values() if it is not None])
        for index, item in wanted.items():
            where = f"{value}/{stem(samples[index].item.key)}.*" if by == "path" else f"column {value!r}"
            result = results[item.key] if item is not None else f"no {kind} image (looked for {where})"
            if isinstance(result, str):
                reason = result if item is None else f"{kind} image {item.location} unusable: {result}"
                report.missing.append({"path": samples[index].item.location, "reason": reason})
                lacking.setdefault(index, reason)
                continue
            width, height, *_ = result
            clip, unusable = companion_clip(kind, item, result, samples[index].clip)
            if unusable:
                report.missing.append({"path": samples[index].item.location, "reason": unusable})
                lacking.setdefault(index, unusable)
                continue
            bucket = spec_bucket(width, height, spec) if kind == "reference" and own_bucket else None
            found[index].append(Companion(kind, slot, key, item, width, height, bucket, clip))
            report.pairs += 1
        report.orphans += orphans
    paired = []
    for index, sample in enumerate(samples):
        if index in lacking:
            skipped.append({"path": sample.item.location, "reason": lacking[index]})
            continue
        paired.append(dataclasses.replace(sample, companions=tuple(found[index])))
    return paired, reports


def companion_clip(kind: str, item: Item, probed: tuple, target: Clip | None) -> tuple[Clip | None, str | None]:
    """(the companion's clip, or None for a still; why it cannot serve, or None). A mask or control of a clip may be a
    still (it holds for every frame) or a clip of at least the target's frames at its frame rate, whose frames the
    target's window takes. A reference is an image; an image's companion a still (an animation's first frame)."""
    moving = len(probed) >= 5 and probed[4] > 1  # (w, h, note, fps, frames): a video or an animation
    if not moving or target is None:
        if moving and suffix_is_video(item.key):
            return None, f"{kind} {item.location} is a video clip; its target is an image"
        return None, None
    clip = Clip(float(probed[3]), int(probed[4]))
    if kind == "reference":
        return None, f"reference {item.location} is a clip; a reference is an image"
    if clip.frames < target.frames or abs(clip.fps - target.fps) > 0.01 * target.fps:
        return None, (
            f"{kind} clip {item.location} has {clip.frames} frames at {clip.fps:g} fps; its clip has {target.frames} "
            f"at {target.fps:g} fps (a {kind} clip needs as many frames at the same rate)"
        )
    return clip, None


def suffix_is_video(key: str) -> bool:
    from datamodules.video import VIDEO_EXTENSIONS

    return PurePosixPath(key).suffix.lower() in VIDEO_EXTENSIONS


def _match_by_stem(source: Source, samples: list) -> tuple[dict[int, Item | None], list[dict]]:
    """Each sample's companion of the same relative path and stem (None: none), and the companions no
    sample claimed. Of two companions with one stem (cat.png and cat.jpg) the first by name is taken and
    the other reported."""
    by_stem: dict[str, Item] = {}
    extra: list[Item] = []
    for item in sorted(source.items(), key=lambda it: it.key):
        if stem(item.key) in by_stem:
            extra.append(item)
        else:
            by_stem[stem(item.key)] = item
    wanted = {i: by_stem.get(stem(s.item.key)) for i, s in enumerate(samples)}
    claimed = {it.key for it in wanted.values() if it is not None}
    unclaimed = [{"path": it.location, "reason": "no training image of its path and stem"} for it in by_stem.values()]
    return wanted, [o for o, it in zip(unclaimed, by_stem.values(), strict=True) if it.key not in claimed] + [
        {"path": it.location, "reason": f"another file has its stem ({by_stem[stem(it.key)].location} is used)"}
        for it in extra
    ]
