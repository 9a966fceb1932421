"""Aspect buckets and the stateful, distributed-aware bucket batch sampler."""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)

RESOLUTION_TYPES = ("pixel", "area")
MAX_ASPECT = 4.0  # wider or taller images are cropped to this ratio rather than given a sliver bucket


def _align(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)


CROP_ASPECTS = ("preserve", "square", "closest")
DEFAULT_ASPECT_BUCKETS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16, 2.0, 0.5)


def target_aspect(width: int, height: int, crop_aspect: str = "preserve", choices=DEFAULT_ASPECT_BUCKETS) -> float:
    """The aspect ratio (w/h) an image is trained at: its own, square, or the closest of ``choices``."""
    own = width / height
    if crop_aspect == "preserve":
        return own
    if crop_aspect == "square":
        return 1.0
    if crop_aspect == "closest":
        return min(choices, key=lambda a: abs(math.log(a / own)))
    raise ValueError(f"unknown crop_aspect {crop_aspect!r}; valid: {', '.join(CROP_ASPECTS)}")


def bucket_for(
    width: int,
    height: int,
    resolution: float,
    resolution_type: str,
    step: int = 64,
    crop_aspect: str = "preserve",
    aspect_choices=DEFAULT_ASPECT_BUCKETS,
) -> tuple[int, int]:
    """The (width, height) bucket of an image of the given size.

    ``area``: the bucket's area is ``resolution``² pixels (or ``resolution`` megapixels when it is
    below 16), with the target aspect ratio (``target_aspect``). ``pixel``: the shorter edge is
    ``resolution``. Both edges are then aligned to ``step``, so images of near-equal aspect share a bucket.
    """
    aspect = target_aspect(width, height, crop_aspect, aspect_choices)
    aspect = min(max(aspect, 1 / MAX_ASPECT), MAX_ASPECT)
    if resolution_type == "area":
        area = resolution * 1e6 if resolution < 16 else resolution**2
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
    elif resolution_type == "pixel":
        w, h = (resolution * aspect, resolution) if aspect >= 1 else (resolution, resolution / aspect)
    else:
        raise ValueError(f"unknown resolution_type {resolution_type!r}; valid: {', '.join(RESOLUTION_TYPES)}")
    return _align(w, step), _align(h, step)


def _label(group: tuple) -> str:
    """``64x48``; a group with references in their own buckets: ``64x48+48x64``; clips of 17 frames: ``64x48x17f``."""
    if isinstance(group[0], int):
        return f"{group[0]}x{group[1]}"
    bucket, own, *frames = group
    return "+".join(_label(b) for b in (bucket, *own)) + "".join(f"x{f}f" for f in frames)


def _sort_key(group: tuple) -> tuple:
    """Every kind of group as (bucket, own buckets, frames), so they sort together (and plain buckets as before)."""
    if isinstance(group[0], int):
        return group, (), 1
    bucket, own, *frames = group
    return bucket, own, frames[0] if frames else 1


class BucketBatchSampler:
    """Yields batches of ``(index, epoch)`` keys in which every sample shares one bucket.

    - A bucket smaller than a batch, or a bucket's last partial batch, is filled by repeating its own
      images, so no image is dropped.
    - The batch order is a pure function of (seed, epoch); ranks take disjoint slices of it
      (padded so every rank gets the same count, which DDP needs).
    - ``state_dict``/``load_state_dict`` hold the position inside an epoch, for exact resume.
    """

    def __init__(
        self,
        buckets: Sequence[tuple],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        datasets: Sequence[str] | None = None,
        repeats: dict[str, int] | None = None,
        probability: dict[str, float] | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not buckets:
            raise ValueError("no samples to batch")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        datasets = list(datasets) if datasets is not None else ["default"] * len(buckets)
        self.repeats, self.probability = dict(repeats or {}), dict(probability or {})
        # bucket -> dataset -> sample indices
        # a bucket is (w, h), or (bucket, references' own buckets) for paired data (Sample.group)
        groups: dict[tuple, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for index, (bucket, dataset) in enumerate(zip(buckets, datasets, strict=True)):
            groups[tuple(bucket)][dataset].append(index)
        ordered = sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))
        self.groups = {b: dict(sorted(by_ds.items())) for b, by_ds in ordered}
        self.epoch = 0
        self._resume: dict | None = None

    def _epoch_pool(self, by_dataset: dict[str, list[int]], rng: random.Random) -> list[int]:
        """One bucket's samples for an epoch: each dataset's images 1 + ``repeats`` times, then a random
        ``probability`` share of them. The share has a fixed size, so every epoch has as many batches."""
        pool = []
        for dataset, indices in by_dataset.items():
            copies = indices * (1 + self.repeats.get(dataset, 0))
            p = self.probability.get(dataset, 1.0)
            if p < 1.0:
                copies = rng.sample(copies, max(1, round(p * len(copies))))
            pool += copies
        return pool

    def _bucket_size(self, by_dataset: dict[str, list[int]]) -> int:
        total = 0
        for dataset, indices in by_dataset.items():
            n = len(indices) * (1 + self.repeats.get(dataset, 0))
            p = self.probability.get(dataset, 1.0)
            total += max(1, round(p * n)) if p < 1.0 else n
        return total

    def _all_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        batches = []
        for by_dataset in self.groups.values():
            order = self._epoch_pool(by_dataset, rng)
            rng.shuffle(order)
            short = -len(order) % self.batch_size
            order += [order[i % len(order)] for i in range(short)]  # fill from the bucket itself
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng.shuffle(batches)
        pad = -len(batches) % self.world_size
        return batches + [batches[i % len(batches)] for i in range(pad)]  # cyclic: fewer batches than ranks

    def __len__(self) -> int:
        total = sum(math.ceil(self._bucket_size(by_ds) / self.batch_size) for by_ds in self.groups.values())
        return math.ceil(total / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> BucketBatchSampler:
        # Lightning calls set_epoch on ``dataloader.batch_sampler.sampler`` at each epoch start; this
        # sampler keeps its own epoch, so it stands as its own inner sampler.
        return self

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        mine = self._all_batches(epoch)[self.rank :: self.world_size]
        start = 0
        if self._resume is not None:
            if self._resume["epoch"] == epoch:
                start = self._resume["batch"]
            self._resume = None
        for batch in mine[start:]:
            yield [(index, epoch) for index in batch]

    def _layout(self) -> dict:
        """What the batch order depends on besides the epoch: if any of it changed, a saved position
        points at different images."""
        return {
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "buckets": {_label(group): self._bucket_size(by_ds) for group, by_ds in self.groups.items()},
        }

    def state_dict(self, batches_done: int) -> dict:
        return {"epoch": self.epoch, "batch": batches_done, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        saved = {k: state.get(k) for k in self._layout()}
        if saved != self._layout():
            changed = ", ".join(k for k in saved if saved[k] != self._layout()[k])
            log.warning(
                "the data changed since the checkpoint (%s); the resumed epoch starts from its first batch", changed
            )
            return
        self._resume = {"epoch": int(state["epoch"]), "batch": int(state["batch"])}
