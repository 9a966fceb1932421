"""The LightningDataModule: scan datasets, bucket them, and serve one-bucket batches."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.buckets import BucketBatchSampler
from datamodules.cache import TensorCache, cache_key
from datamodules.dataset import BucketedImageDataset, collate, encode_entries
from datamodules.pairs import companion_entry, open_companion_sources
from datamodules.pairs import slots as pair_slots
from datamodules.scan import DECODE_ERRORS, Sample, ScanResult, scan_source
from datamodules.sources import Source, SourceError, open_source
from datamodules.spec import DATASET_KEYS, SOURCE_OPTIONS
from datamodules.spec import defaults as spec_defaults

log = logging.getLogger(__name__)
PHASE = logging.getLogger("tuner.phase")  # one console line per phase (tuner/runtime/console.py)

class EmptyDatasetError(ValueError):
    """No usable image in any dataset, or none at a usable size: raised before any model weights load."""


UPSCALE_WARN, UPSCALE_REFUSE = 2.0, 4.0  # the median image's enlargement along an edge


def check_upscale(dataset: str, samples: list[Sample], spec: dict, allow: bool = False) -> float:
    """Warn when the buckets enlarge the median image more than 2x along an edge, and refuse more than 4x
    unless ``data.allow_upscale=true``: a resolution far above the images (``resolution=7`` read as 7
    megapixels) spends an hour encoding latents before the first step, costs memory, and teaches blur.
    Returns that median factor."""
    if not samples:
        return 1.0
    factor = [max(s.bucket[0] / s.width, s.bucket[1] / s.height) for s in samples]
    median = sorted(factor)[len(factor) // 2]
    if median <= UPSCALE_WARN:
        return median
    typical = samples[factor.index(median)]
    what = (
        f"dataset {dataset!r}: the buckets enlarge the median image {median:.1f}x (e.g. {typical.width}x"
        f"{typical.height} px into a {typical.bucket[0]}x{typical.bucket[1]} bucket)"
    )
    unit = "megapixels" if spec["resolution_type"] == "area" and spec["resolution"] < 16 else "px"
    setting = f"data.resolution={spec['resolution']:g} ({unit}, resolution_type={spec['resolution_type']})"
    if median > UPSCALE_REFUSE and not allow:
        hint = " for an edge in pixels, set resolution_type=pixel;" if spec["resolution_type"] == "area" else ""
        raise EmptyDatasetError(
            f"{what}: {setting} is far above the images;{hint} or lower data.resolution; "
            "data.allow_upscale=true trains at this size anyway"
        )
    log.warning("%s; check %s", what, setting)
    return median


def clip_entry(sample: Sample) -> dict:
    """A clip as the report lists it: what the file holds, and what a use of it takes."""
    clip = sample.clip
    return {
        "fps": round(clip.fps, 3),
        "frames": clip.frames,
        "duration": round(clip.duration, 3),
        "num_frames": sample.num_frames,
        "frame_rate": sample.frame_rate or round(clip.fps, 3),
        "frame_sampling": sample.frame_sampling,
    }


def latent_key(s: Sample, vae: str) -> str:
    """A sample's latent-cache key: everything that changes its encoding (the file, bucket and crop, the VAE; a
    paired sample's companions, whose encodings its entry holds; a clip's frame window)."""
    return cache_key(
        s.item.location,
        s.item.version,
        s.bucket,
        s.crop_style,
        s.crop,
        s.scale_to,
        vae,
        *([[c.kind, c.item.location, c.item.version, c.bucket] for c in s.companions] if s.companions else []),
        *(["alpha mask"] if s.mask_from_alpha else []),
        *([s.num_frames, s.frame_rate, s.frame_sampling] if s.clip is not None else []),
    )


def shard_hint(path: str) -> str:
    """For a folder read as images that holds ``.tar`` shards: the hint to read it as webdataset."""
    if not os.path.isdir(path):
        return ""
    shards = sorted(e for e in os.listdir(path) if e.endswith(".tar"))
    if not shards:
        return ""
    shown = ", ".join(shards[:3]) + (", ..." if len(shards) > 3 else "")
    return f"; {path!r} holds {len(shards)} .tar shard(s) ({shown}): to train on them set data.type=webdataset"


def split_held_out(samples: list[Sample], share: float) -> tuple[list[Sample], list[Sample]]:
    """(train, held out): each image is held out by a hash of its identity, so the split is stable
    across runs and does not reshuffle when images are added. At least one of each."""

    def score(s: Sample) -> float:
        return int(hashlib.sha256(s.item.location.encode()).hexdigest()[:8], 16) / 16**8

    held = [s for s in samples if score(s) < share]
    if not held:
        held = [min(samples, key=score)]
    train = [s for s in samples if s not in held]
    if not train:
        raise EmptyDatasetError(f"data.validation_split={share} leaves no image to train on")
    return train, held


class DiffusionDataModule(L.LightningDataModule):
    """One or more image folders, aspect-bucketed, in one-bucket batches.

    Data-level keys are the defaults for every entry of ``datasets``; with no entries, ``path`` is the
    single dataset. ``caption_dropout_probability`` is read by the model's training step, not here.
    """

    def __init__(
        self,
        datasets: dict[str, dict] | None = None,
        batch_size: int = 1,
        caption_dropout_probability: float = 0.1,
        cache_dir: str | None = None,
        validation_split: float = 0.0,
        cache_latents: bool = True,
        cache_text_embeds: bool = True,
        num_workers: int = 0,
        allow_large_buckets: bool = False,  # checked with the config (tuner.config); nothing to do here
        allow_upscale: bool = False,  # buckets may enlarge the median image more than 4x (check_upscale)
        seed: int = 0,
        report_path: str | None = None,
        references_own_bucket: bool = False,
        reference_pixels: bool = False,
        video: bool = False,
        **dataset_keys: Any,
    ):
        """``dataset_keys`` are the data-level values of the keys in datamodules/spec.py (the defaults of
        every entry of ``datasets``). The family's (tuner/run.py): ``references_own_bucket``, a reference
        image of another aspect ratio keeps its own bucket; ``reference_pixels``, batches carry the
        references' pixels even when their latents are cached; ``video``, it trains on clips (else a clip is
        skipped with the reason)."""
        super().__init__()
        unknown = sorted(set(dataset_keys) - set(DATASET_KEYS))
        if unknown:
            raise TypeError(f"unknown data keys {unknown}; valid: {', '.join(DATASET_KEYS)}")
        level = {**spec_defaults(), **{k: v for k, v in dataset_keys.items() if v is not None or k == "path"}}
        level["crop_aspect_buckets"] = tuple(level["crop_aspect_buckets"])
        level["type"] = None  # a data-level path infers its own kind; only an entry's type overrides it
        self.specs = {
            name: {k: (entry.get(k) if entry.get(k) is not None else level[k]) for k in DATASET_KEYS}
            for name, entry in (datasets or {"default": {}}).items()
        }
        for spec in self.specs.values():  # a table reads the columns that name companion images
            spec["companion_columns"] = [v for _, _, by, v in pair_slots(spec) if by == "column"]
        self.references_own_bucket, self.reference_pixels = references_own_bucket, reference_pixels
        self.video = video
        self.sources = self._open_sources(cache_dir)
        for name, spec in self.specs.items():  # unset: where this kind of source keeps its captions
            source = self.sources[name]
            spec["caption_strategy"] = spec["caption_strategy"] or source.default_caption_strategy
            source.options["caption_strategy"] = spec["caption_strategy"]
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.report_path = report_path
        self.report_written: str | None = None
        self.cache_dir = cache_dir
        self.validation_split = validation_split
        self.allow_upscale = allow_upscale
        self.held_out: list[Sample] = []
        self.cache_latents, self.cache_text_embeds = cache_latents, cache_text_embeds
        self._encoders: dict | None = None
        self._dataset: BucketedImageDataset | None = None
        self.results: dict[str, ScanResult] = {}
        self.samples: list[Sample] | None = None
        self._resume: dict | None = None
        self._sampler: BucketBatchSampler | None = None

    def _open_sources(self, cache_dir: str | None) -> dict[str, Source]:
        for name, spec in self.specs.items():
            if not spec["path"]:
                raise EmptyDatasetError(f"dataset {name!r} has no path: set data.path or data.datasets.{name}.path")
        sources: dict[str, Source] = {}
        self.companion_sources: dict[str, dict[str, Source]] = {}
        try:
            for name, spec in self.specs.items():
                options = {"cache_dir": cache_dir, **{k: spec[k] for k in (*SOURCE_OPTIONS, "companion_columns")}}
                sources[name] = open_source(str(spec["path"]), spec["type"], options)
                self.companion_sources[name] = open_companion_sources(name, spec, sources[name], options)
                sources.update(self.companion_sources[name])
        except SourceError as err:
            raise EmptyDatasetError(str(err)) from err
        return sources

    def scan(self) -> list[Sample]:
        """Scan every dataset once; write the report; fail clearly when nothing is usable."""
        if self.samples is not None:
            return self.samples
        for name, spec in self.specs.items():
            try:
                self.results[name] = scan_source(
                    name,
                    spec,
                    self.sources[name],
                    self.cache_dir,
                    self.companion_sources[name],
                    self.references_own_bucket,
                    self.video,
                )
            except SourceError as err:
                raise EmptyDatasetError(f"dataset {name!r}: {err}") from err
        usable = [s for r in self.results.values() for s in r.usable]
        skipped = [s for r in self.results.values() for s in r.skipped]
        fallbacks = sum(r.caption_fallbacks for r in self.results.values())
        if self.report_path:
            self._write_report(usable, skipped)  # every usable image, held-out ones included
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
        for name, result in self.results.items():
            for kind, pairs in result.pairs.items():
                log.info(
                    "data: dataset %r: %d %s pairs, %d images without one, %d %s images without a target",
                    name,
                    pairs.pairs,
                    kind,
                    len(pairs.missing),
                    len(pairs.orphans),
                    kind,
                )
        if not usable:
            paths = ", ".join(repr(spec["path"]) for spec in self.specs.values())
            where = self.report_written or "dataset_report.json"
            hint = "".join(shard_hint(str(spec["path"])) for spec in self.specs.values() if spec["type"] != "webdataset")
            raise EmptyDatasetError(f"no usable images in {paths} ({len(skipped)} skipped; see {where}){hint}")
        for name, result in self.results.items():
            check_upscale(name, result.usable, self.specs[name], self.allow_upscale)
        if self.validation_split > 0:
            usable, self.held_out = split_held_out(usable, self.validation_split)
            log.info("data: %d images held out for the validation loss", len(self.held_out))
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
                    **({"format": s.note} if s.note else {}),
                    **({"companions": [companion_entry(c) for c in s.companions]} if s.companions else {}),
                    **({"clip": clip_entry(s)} if s.clip is not None else {}),
                }
                for s in usable
            ],
            "skipped": skipped,
        }
        pairs = {name: {k: p.as_dict() for k, p in r.pairs.items()} for name, r in self.results.items() if r.pairs}
        if pairs:  # per dataset and kind: pairs, targets without a companion, companions without a target
            report["pairs"] = pairs
        path = Path(self.report_path)
        if not usable and path.exists():
            # A failed preflight in a used output_dir leaves that run's report as it was.
            path = path.with_name(f"{path.stem}.failed{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, path)
        self.report_written = str(path)

    def setup(self, stage: str | None = None) -> None:
        self.scan()

    def attach_encoders(self, encode_pixels, encode_prompts, identity: dict, offload) -> None:
        """The model's encoders, for the latent and text-embedding caches (``DiffusionModule.data_encoders``).

        The caches are filled when the first train dataloader is built, by which time Lightning has moved
        the model to its device. ``encode_pixels`` is None for a pixel-space family: no image cache."""
        self._encoders = {"encode_pixels": encode_pixels, "encode_prompts": encode_prompts, "offload": offload}
        self._identity = identity

    def summary(self) -> str:
        """One line for the console, after ``scan``: what is usable and what was skipped."""
        results = self.results.values()
        usable = sum(len(r.usable) for r in results)
        skipped = sum(len(r.skipped) for r in results)
        buckets = len({s.bucket for s in self.samples})
        held = f" ({len(self.held_out)} held out for validation)" if self.held_out else ""
        why = f", {skipped} skipped (reasons in {Path(self.report_path).name})" if skipped else ""
        return f"{usable} images{held} in {buckets} buckets{why}"

    def _build_dataset(self, rank: int, world: int) -> BucketedImageDataset:
        """The dataset, with the caches filled first when encoders are attached and a cache_dir is set."""
        samples = self.scan()
        plain = BucketedImageDataset(samples, self.sources, self.seed)
        if self._encoders is None or not self.cache_dir:
            return plain
        root = Path(self.cache_dir)
        latent_keys = embeds = None
        # a random crop or frame window differs per use, so it is not cached
        random_crops = any((s.crop and s.crop_style == "random") or (s.clip and s.frame_sampling == "random") for s in samples)
        pixel_space = self._encoders["encode_pixels"] is None
        if self.cache_latents and pixel_space:
            log.info("latent cache off: the model trains in pixel space (text embeddings are still cached)")
        elif self.cache_latents and random_crops:
            log.info("latent cache off: a dataset crops (or takes clip frames) at random, so each use needs a fresh draw")
        started, encoded_images, encoded_captions = time.monotonic(), 0, 0
        if self.cache_latents and not random_crops and not pixel_space:
            latents = TensorCache(root / "latents")
            latent_keys = [latent_key(s, self._identity["vae"]) for s in samples]
            encoded_images = self._fill_latents(plain, latents, latent_keys, rank, world)
        if self.cache_text_embeds:
            embeds = TensorCache(root / "text_embeds")
            encoded_captions = self._fill_embeds(embeds, sorted({c for s in samples for c in s.captions}), rank, world)
        if self.trainer is not None:
            self.trainer.strategy.barrier("tuner.cache.filled")
        if latent_keys is not None or embeds is not None:
            kept = ("latents" if latent_keys is not None else "") + (" and " * bool(latent_keys is not None and embeds))
            kept += "text embeddings" if embeds is not None else ""
            PHASE.info(
                "cache: %s in %s; encoded %d images and %d captions now, the rest reused (%.1f s)",
                kept,
                root,
                encoded_images,
                encoded_captions,
                time.monotonic() - started,
            )
        self._encoders["offload"](vae=latent_keys is not None, text=embeds is not None)
        return BucketedImageDataset(
            samples,
            self.sources,
            self.seed,
            latents=latents if latent_keys is not None else None,
            latent_keys=latent_keys,
            embeds=embeds,
            embed_identity=self._identity["text"],
            encoders=None if self.num_workers else {k: self._encoders[k] for k in ("encode_pixels", "encode_prompts")},
            reference_pixels=self.reference_pixels,
        )

    def _fill_latents(self, plain, latents: TensorCache, keys: list[str], rank: int, world: int) -> int:
        # Each process takes a fixed share of all entries and fills what is missing of it. (Sharing out
        # only the missing ones would race: a process that looks later sees another's fresh entries.)
        todo = [i for i in range(len(keys))[rank::world] if not latents.has(keys[i])]
        by_group: dict[tuple, list[int]] = {}
        for i in todo:
            by_group.setdefault(plain.samples[i].group, []).append(i)
        for indices in by_group.values():
            for start in range(0, len(indices), self.batch_size):
                paired, kept = [], []
                for i in indices[start : start + self.batch_size]:
                    try:
                        paired.append(plain.paired(i, epoch=0))
                    except DECODE_ERRORS as err:
                        # Passed the scan but fails to decode now: left out of the cache, so loading it
                        # fails too and the dataset serves another image of its bucket instead.
                        log.warning("could not load %s (%s); not cached", plain.samples[i].item.location, err)
                        continue
                    kept.append(i)
                if kept:
                    for i, entry in zip(kept, encode_entries(paired, self._encoders["encode_pixels"]), strict=True):
                        latents.save(keys[i], entry)
        if todo:
            log.info("latent cache: encoded %d images on this process", len(todo))
        return len(todo)

    def _fill_embeds(self, embeds: TensorCache, captions: list[str], rank: int, world: int) -> int:
        identity = self._identity["text"]
        todo = [c for c in captions[rank::world] if not embeds.has(cache_key(c, identity))]
        encode = self._encoders["encode_prompts"]
        for start in range(0, len(todo), 32):
            chunk = todo[start : start + 32]
            with torch.no_grad():
                cond = encode(chunk)
            for row, caption in enumerate(chunk):
                embeds.save(cache_key(caption, identity), {k: v[row].float() for k, v in cond.items()})
        if todo:
            log.info("text-embedding cache: encoded %d captions on this process", len(todo))
        return len(todo)

    def make_sampler(self, rank: int = 0, world_size: int = 1) -> BucketBatchSampler:
        samples = self.scan()
        return BucketBatchSampler(
            [s.group for s in samples],
            self.batch_size,
            self.seed,
            rank,
            world_size,
            datasets=[s.dataset for s in samples],
            repeats={name: spec["repeats"] for name, spec in self.specs.items()},
            probability={name: spec["probability"] for name, spec in self.specs.items()},
        )

    def fixed_batches(self, n: int) -> list[dict[str, Any]]:
        """The first ``n`` batches of a fixed order (seed, epoch 0, one process), from the held-out images
        when ``validation_split`` is set, else from the training set: the same batches at every
        validation and in every sweep job with this data, so the validation loss is comparable."""
        self.scan()
        if self.held_out:
            dataset = BucketedImageDataset(self.held_out, self.sources, self.seed)
            sampler = BucketBatchSampler([s.group for s in self.held_out], self.batch_size, self.seed)
        else:
            dataset = self._dataset or BucketedImageDataset(self.samples, self.sources, self.seed)
            sampler = self.make_sampler(rank=0, world_size=1)
        batches = []
        for keys in sampler:
            batches.append(collate([dataset[k] for k in keys]))
            if len(batches) == n:
                break
        return batches

    def _check_ranks_agree(self, samples: list[Sample]) -> None:
        """Every process scans for itself; if they saw different data (a file changed, a fetch failed on
        one), their samplers would disagree and DDP would hang or mix batches. Fail clearly instead."""
        if self.trainer is None or self.trainer.world_size == 1:
            return
        digest = hashlib.sha256(repr([(s.item.key, s.item.version, s.bucket) for s in samples]).encode())
        mine = int.from_bytes(digest.digest()[:7], "little")  # fits a float64 exactly, for any backend
        reference = self.trainer.strategy.broadcast(mine, src=0)
        flag = torch.tensor(float(mine != reference), device=self.trainer.strategy.root_device)
        differs = self.trainer.strategy.reduce(flag, reduce_op="sum")
        if float(differs) > 0:
            raise EmptyDatasetError(
                f"the {self.trainer.world_size} processes scanned different data ({int(differs)} differ from "
                "rank 0): a file changed or could not be read during the scan; run again"
            )

    def train_dataloader(self) -> DataLoader:
        samples = self.scan()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self._check_ranks_agree(samples)
        self._sampler = self.make_sampler(rank, world)
        if self._resume is not None:
            self._sampler.load_state_dict(self._resume)
            self._resume = None
        if self._dataset is None:
            self._dataset = self._build_dataset(rank, world)
        return DataLoader(
            self._dataset,
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
