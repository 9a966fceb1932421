"""The LightningDataModule: scan datasets, bucket them, and serve one-bucket batches."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.buckets import DEFAULT_ASPECT_BUCKETS, BucketBatchSampler
from datamodules.images import load_rgb, resize_and_crop, to_tensor
from datamodules.scan import DECODE_ERRORS, Sample, ScanResult, scan_source
from datamodules.sources import Source, SourceError, open_source

log = logging.getLogger(__name__)

# Keys a dataset entry may set; any it leaves out come from the data-level defaults.
DATASET_KEYS = (
    "path",
    "type",
    "resolution",
    "resolution_type",
    "bucket_step",
    "crop_style",
    "caption_strategy",
    "instance_prompt",
    "minimum_image_size",
    "endpoint_url",
    "image_column",
    "caption_column",
    "multiline_captions",
    "crop",
    "crop_aspect",
    "crop_aspect_buckets",
    "repeats",
    "probability",
    "is_regularisation_data",
)
# Of those, the ones handed to the source itself (with ``cache_dir``).
SOURCE_OPTIONS = ("endpoint_url", "image_column", "caption_column")


class EmptyDatasetError(ValueError):
    """No usable image in any dataset: raised before any model weights load."""


class BucketedImageDataset(Dataset):
    """Loads ``samples[index]`` resized and cropped to its bucket. Keys are ``(index, epoch)``.

    An image that passed the scan but fails to decode now (changed on disk, damaged past its header)
    is replaced by another of the same bucket, so the batch still holds one bucket; the failure is
    logged with its path.
    """

    def __init__(self, samples: list[Sample], sources: dict[str, Source], seed: int):
        self.samples, self.sources, self.seed = samples, sources, seed
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, sample in enumerate(samples):
            self.by_bucket.setdefault(sample.bucket, []).append(index)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int, epoch: int) -> dict[str, Any]:
        sample = self.samples[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")  # crops and caption draws repeat exactly on resume
        with self.sources[sample.dataset].open(sample.item) as fp:
            # Square draft request: EXIF rotation may swap the axes after decoding.
            side = max(sample.bucket)
            image = load_rgb(fp, draft_size=(side, side))
        image, (top, left) = resize_and_crop(image, sample.bucket, sample.crop_style, rng, sample.crop)
        bw, bh = sample.bucket
        return {
            "pixels": to_tensor(image),
            "caption": sample.captions[rng.randrange(len(sample.captions))]
            if len(sample.captions) > 1
            else sample.caption,
            "original_size": (sample.height, sample.width),
            "crop_top_left": (top, left),
            "target_size": (bh, bw),
            "is_regularisation": sample.regularisation,
        }

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        peers = self.by_bucket[self.samples[index].bucket]
        start = peers.index(index)
        for candidate in (peers[(start + k) % len(peers)] for k in range(min(len(peers), 8))):
            try:
                return self._load(candidate, epoch)
            except DECODE_ERRORS as err:
                log.warning(
                    "could not load %s (%s); using another image of its bucket",
                    self.samples[candidate].item.location,
                    err,
                )
        raise RuntimeError(f"no image of bucket {self.samples[index].bucket} could be loaded")


def collate(items: list[dict]) -> dict[str, Any]:
    return {
        "pixels": torch.stack([it["pixels"] for it in items]),  # (B, 3, H, W), one bucket
        "captions": [it["caption"] for it in items],
        "original_size": torch.tensor([it["original_size"] for it in items]),  # (B, 2) as (h, w)
        "crop_top_left": torch.tensor([it["crop_top_left"] for it in items]),  # (B, 2) as (y, x)
        "target_size": torch.tensor([it["target_size"] for it in items]),  # (B, 2) as (h, w)
        "is_regularisation": torch.tensor([it["is_regularisation"] for it in items]),  # (B,) bool
    }


class DiffusionDataModule(L.LightningDataModule):
    """One or more image folders, aspect-bucketed, in one-bucket batches.

    Data-level keys are the defaults for every entry of ``datasets``; with no entries, ``path`` is the
    single dataset. ``caption_dropout_probability`` is read by the model's training step, not here.
    """

    def __init__(
        self,
        path: str | None = None,
        batch_size: int = 1,
        resolution: float = 1024,
        resolution_type: str = "area",
        bucket_step: int = 64,
        crop_style: str = "center",
        caption_strategy: str = "filename",
        caption_dropout_probability: float = 0.1,
        instance_prompt: str | None = None,
        minimum_image_size: int = 0,
        multiline_captions: bool = True,
        crop: bool = True,
        crop_aspect: str = "preserve",
        crop_aspect_buckets: tuple[float, ...] = DEFAULT_ASPECT_BUCKETS,
        repeats: int = 0,
        probability: float = 1.0,
        is_regularisation_data: bool = False,
        endpoint_url: str | None = None,
        image_column: str = "file_name",
        caption_column: str = "text",
        cache_dir: str | None = None,
        num_workers: int = 0,
        datasets: dict[str, dict] | None = None,
        seed: int = 0,
        report_path: str | None = None,
    ):
        super().__init__()
        defaults = {
            "path": path,
            "resolution": resolution,
            "resolution_type": resolution_type,
            "bucket_step": bucket_step,
            "crop_style": crop_style,
            "caption_strategy": caption_strategy,
            "instance_prompt": instance_prompt,
            "minimum_image_size": minimum_image_size,
            "multiline_captions": multiline_captions,
            "crop": crop,
            "crop_aspect": crop_aspect,
            "crop_aspect_buckets": tuple(crop_aspect_buckets),
            "repeats": repeats,
            "probability": probability,
            "is_regularisation_data": is_regularisation_data,
            "endpoint_url": endpoint_url,
            "image_column": image_column,
            "caption_column": caption_column,
        }
        defaults["type"] = None
        entries = datasets or {"default": {}}
        self.specs = {
            name: {k: (entry.get(k) if entry.get(k) is not None else defaults[k]) for k in DATASET_KEYS}
            for name, entry in entries.items()
        }
        for name, spec in self.specs.items():
            if not spec["path"]:
                raise EmptyDatasetError(f"dataset {name!r} has no path: set data.path or data.datasets.{name}.path")
        try:
            self.sources = {
                name: open_source(
                    str(spec["path"]),
                    spec["type"],
                    {"cache_dir": cache_dir, **{k: spec[k] for k in SOURCE_OPTIONS}},
                )
                for name, spec in self.specs.items()
            }
        except SourceError as err:
            raise EmptyDatasetError(str(err)) from err
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.report_path = report_path
        self.cache_dir = cache_dir
        self.results: dict[str, ScanResult] = {}
        self.samples: list[Sample] | None = None
        self._resume: dict | None = None
        self._sampler: BucketBatchSampler | None = None

    def scan(self) -> list[Sample]:
        """Scan every dataset once; write the report; fail clearly when nothing is usable."""
        if self.samples is not None:
            return self.samples
        for name, spec in self.specs.items():
            try:
                self.results[name] = scan_source(name, spec, self.sources[name], self.cache_dir)
            except SourceError as err:
                raise EmptyDatasetError(f"dataset {name!r}: {err}") from err
        usable = [s for r in self.results.values() for s in r.usable]
        skipped = [s for r in self.results.values() for s in r.skipped]
        fallbacks = sum(r.caption_fallbacks for r in self.results.values())
        if self.report_path:
            self._write_report(usable, skipped)
        buckets: dict[tuple[int, int], int] = {}
        for sample in usable:
            buckets[sample.bucket] = buckets.get(sample.bucket, 0) + 1
        log.info(
            "data: %d usable, %d skipped, %d captions from file names for want of a sidecar; buckets %s",
            len(usable),
            len(skipped),
            fallbacks,
            {f"{w}x{h}": n for (w, h), n in sorted(buckets.items())},
        )
        for item in skipped:
            log.warning("skipped %s: %s", item["path"], item["reason"])
        if not usable:
            paths = ", ".join(repr(spec["path"]) for spec in self.specs.values())
            raise EmptyDatasetError(
                f"no usable images in {paths} ({len(skipped)} skipped; see dataset_report.json for reasons)"
            )
        self.samples = usable
        return usable

    def _write_report(self, usable: list[Sample], skipped: list[dict]) -> None:
        if int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0:
            return
        report = {
            "usable": [
                {
                    "path": s.item.location,
                    "width": s.width,
                    "height": s.height,
                    "bucket": list(s.bucket),
                    "caption": s.caption,
                    "dataset": s.dataset,
                    **({"captions": list(s.captions)} if len(s.captions) > 1 else {}),
                }
                for s in usable
            ],
            "skipped": skipped,
        }
        path = Path(self.report_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, path)

    def setup(self, stage: str | None = None) -> None:
        self.scan()

    def train_dataloader(self) -> DataLoader:
        samples = self.scan()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self._sampler = BucketBatchSampler(
            [s.bucket for s in samples],
            self.batch_size,
            self.seed,
            rank,
            world,
            datasets=[s.dataset for s in samples],
            repeats={name: spec["repeats"] for name, spec in self.specs.items()},
            probability={name: spec["probability"] for name, spec in self.specs.items()},
        )
        if self._resume is not None:
            self._sampler.load_state_dict(self._resume)
            self._resume = None
        return DataLoader(
            BucketedImageDataset(samples, self.sources, self.seed),
            batch_sampler=self._sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    # The position inside the epoch comes from the trainer's own progress counters, not from how far
    # the loader's iterator ran: Lightning prefetches a batch ahead, so the iterator is always early.
    def state_dict(self) -> dict:
        if self._sampler is None or self.trainer is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"sampler": self._sampler.state_dict(batches_done=done)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state.get("sampler")
