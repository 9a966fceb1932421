"""One-bucket samples for training: an image decoded, resized and cropped to its bucket, or its cached
latents and text embeddings (datamodules/cache.py); and the collate that stacks a bucket into a batch."""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from torch.utils.data import Dataset

from datamodules.cache import CorruptEntry, TensorCache, cache_key
from datamodules.images import load_rgb, resize_and_crop, to_tensor
from datamodules.scan import DECODE_ERRORS, Sample
from datamodules.sources import Source

log = logging.getLogger(__name__)


class BucketedImageDataset(Dataset):
    """Loads ``samples[index]`` resized and cropped to its bucket. Keys are ``(index, epoch)``.

    An image that passed the scan but fails to decode now (changed on disk, damaged past its header)
    is replaced by another of the same bucket, so the batch still holds one bucket; the failure is
    logged with its path.
    """

    def __init__(
        self,
        samples: list[Sample],
        sources: dict[str, Source],
        seed: int,
        latents: TensorCache | None = None,
        latent_keys: list[str] | None = None,
        embeds: TensorCache | None = None,
        embed_identity: str | None = None,
        encoders: dict | None = None,
    ):
        self.samples, self.sources, self.seed = samples, sources, seed
        self.latents, self.latent_keys = latents, latent_keys
        self.embeds, self.embed_identity = embeds, embed_identity
        self.encoders = encoders  # encode_pixels / encode_prompts, to encode a corrupt entry again (no workers)
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, sample in enumerate(samples):
            self.by_bucket.setdefault(sample.bucket, []).append(index)

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, index: int, epoch: int) -> tuple[torch.Tensor, tuple[int, int], random.Random]:
        """The sample decoded, resized and cropped: (pixels (3, H, W), crop (top, left), its rng)."""
        sample = self.samples[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")  # crops and caption draws repeat exactly on resume
        with self.sources[sample.dataset].open(sample.item) as fp:
            cover = sample.bucket
            if sample.scale_to is not None:  # a detail crop: decode at least as large as it is scaled to
                cover = (max(cover[0], sample.scale_to[0]), max(cover[1], sample.scale_to[1]))
            image = load_rgb(fp, cover=cover if sample.crop else None)
        image, crop = resize_and_crop(image, sample.bucket, sample.crop_style, rng, sample.crop, sample.scale_to)
        return to_tensor(image), crop, rng

    def _load(self, index: int, epoch: int) -> dict[str, Any]:
        sample = self.samples[index]
        if self.latent_keys is not None:
            entry = self._read(self.latents, self.latent_keys[index], lambda: self._encode_image(index))
            out = {"encoded": entry["encoded"], "crop_top_left": tuple(entry["crop_top_left"].tolist())}
            rng = random.Random(f"{self.seed}:{epoch}:{index}")  # cached crops are never random ones
        else:
            pixels, crop, rng = self.pixels(index, epoch)
            out = {"pixels": pixels, "crop_top_left": crop}
        caption = sample.captions[rng.randrange(len(sample.captions))] if len(sample.captions) > 1 else sample.caption
        if self.embeds is not None:
            key = cache_key(caption, self.embed_identity)
            out["cond"] = self._read(self.embeds, key, lambda: self._encode_caption(caption))
        bw, bh = sample.bucket
        out.update(
            caption=caption,
            original_size=(sample.height, sample.width),
            target_size=(bh, bw),
            is_regularisation=sample.regularisation,
        )
        return out

    def _read(self, cache: TensorCache, key: str, encode) -> dict[str, torch.Tensor]:
        """A cache entry; one that fails its checksum is removed and encoded again here (in a loader worker,
        which has no encoders, the next start encodes it and this use takes another image of its bucket)."""
        try:
            return cache.load(key)
        except CorruptEntry as err:
            cache.discard(key)
            if self.encoders is None:
                log.warning("%s; removed (the next start encodes it again); using another image of its bucket", err)
                raise
            log.warning("%s; encoded again", err)
            tensors = encode()
            cache.save(key, tensors)
            return tensors

    def _encode_image(self, index: int) -> dict[str, torch.Tensor]:
        pixels, crop, _ = self.pixels(index, epoch=0)  # as the cache fill encodes it (cached crops are not random)
        encoded = self.encoders["encode_pixels"](pixels[None]).float().cpu()[0]
        return {"encoded": encoded, "crop_top_left": torch.tensor(crop)}

    def _encode_caption(self, caption: str) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            cond = self.encoders["encode_prompts"]([caption])
        return {k: v[0].float().cpu() for k, v in cond.items()}

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
    batch = {
        "captions": [it["caption"] for it in items],
        "original_size": torch.tensor([it["original_size"] for it in items]),  # (B, 2) as (h, w)
        "crop_top_left": torch.tensor([it["crop_top_left"] for it in items]),  # (B, 2) as (y, x)
        "target_size": torch.tensor([it["target_size"] for it in items]),  # (B, 2) as (h, w)
        "is_regularisation": torch.tensor([it["is_regularisation"] for it in items]),  # (B,) bool
    }
    if "encoded" in items[0]:
        batch["encoded"] = torch.stack([it["encoded"] for it in items])  # (B, 2C, h, w), one bucket
    else:
        batch["pixels"] = torch.stack([it["pixels"] for it in items])  # (B, 3, H, W), one bucket
    if "cond" in items[0]:
        batch["cond"] = {k: torch.stack([it["cond"][k] for it in items]) for k in items[0]["cond"]}
    return batch
