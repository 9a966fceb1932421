"""One-bucket samples for training: an image decoded, resized and cropped to its bucket, or its cached
latents and text embeddings (datamodules/cache.py); and the collate that stacks a bucket into a batch."""

from __future__ import annotations

import logging
import random
from pathlib import PurePosixPath
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules.cache import CorruptEntry, TensorCache, cache_key
from datamodules.images import load_mask, load_rgb, mask_tensor, resize_and_crop, to_tensor
from datamodules.scan import DECODE_ERRORS, Sample
from datamodules.sources import Source
from datamodules.video import ANIMATED_EXTENSIONS, decode, decode_animation, mask_on_grid, window

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
        reference_pixels: bool = False,
    ):
        self.samples, self.sources, self.seed = samples, sources, seed
        self.latents, self.latent_keys = latents, latent_keys
        self.embeds, self.embed_identity = embeds, embed_identity
        self.encoders = encoders  # encode_pixels / encode_prompts, to encode a corrupt entry again (no workers)
        self.reference_pixels = reference_pixels
        self.by_bucket: dict[tuple, list[int]] = {}  # by group: bucket and own-bucket references' buckets
        for index, sample in enumerate(samples):
            self.by_bucket.setdefault(sample.group, []).append(index)

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, index: int, epoch: int) -> tuple[torch.Tensor, tuple[int, int], random.Random]:
        """The sample decoded, resized and cropped: (pixels (3, H, W), crop (top, left), its rng)."""
        pixels, crop, rng, _ = self._target(index, epoch)
        return pixels, crop, rng

    def _target(self, index: int, epoch: int):
        sample = self.samples[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")  # crops and caption draws repeat exactly on resume
        if sample.clip is not None:
            return self._clip(sample, rng)[:4]
        with self.sources[sample.dataset].open(sample.item) as fp:
            cover = sample.bucket
            if sample.scale_to is not None:  # a detail crop: decode at least as large as it is scaled to
                cover = (max(cover[0], sample.scale_to[0]), max(cover[1], sample.scale_to[1]))
            image = load_rgb(fp, cover=cover if sample.crop else None)
        decoded = image.size  # (a JPEG may decode reduced): what companions are brought to before the same crop
        image, crop = resize_and_crop(image, sample.bucket, sample.crop_style, rng, sample.crop, sample.scale_to)
        return to_tensor(image), crop, rng, decoded

    def _clip(self, sample: Sample, rng: random.Random):
        """A clip's window (its frames drawn first, then one crop box for all of them): (3, F, H, W)."""
        indices = window(sample.clip, sample.num_frames, sample.frame_rate, sample.frame_sampling, rng)
        crop: list[tuple[int, int]] = []

        def fit(frame: Image.Image) -> Image.Image:  # the first frame draws the box; the others take it
            at = crop[0] if crop else None
            image, box = resize_and_crop(frame, sample.bucket, sample.crop_style, rng, sample.crop, sample.scale_to, at)
            crop.append(box)
            return image

        animated = PurePosixPath(sample.item.key).suffix.lower() in ANIMATED_EXTENSIONS  # a GIF or WebP: PIL's
        with self.sources[sample.dataset].open(sample.item) as fp:
            frames = (decode_animation if animated else decode)(fp, sample.clip, indices, fit)
        pixels = torch.stack([to_tensor(f) for f in frames], dim=1)  # (3, F, H, W)
        return pixels, crop[0], rng, (sample.width, sample.height), indices

    def paired(self, index: int, epoch: int) -> dict[str, Any]:
        """The target's pixels and crop, with its companions through the same bucket and crop box (a reference
        with a bucket of its own is centre-cropped to it): ``pixels`` (3, H, W), ``crop`` (top, left),
        ``reference_pixels`` [(3, H_r, W_r)] by slot, ``control_pixels`` (3, H, W), ``mask`` (1, H, W) in [0, 1]."""
        sample = self.samples[index]
        if sample.clip is not None:
            pixels, crop, rng, decoded, indices = self._clip(sample, random.Random(f"{self.seed}:{epoch}:{index}"))
        else:
            (pixels, crop, rng, decoded), indices = self._target(index, epoch), None
        out: dict[str, Any] = {"pixels": pixels, "crop": crop, "rng": rng}

        def aligned(img: Image.Image, resample: Image.Resampling) -> Image.Image:
            img = img if img.size == decoded else img.resize(decoded, resample)
            return resize_and_crop(img, sample.bucket, "center", rng, sample.crop, sample.scale_to, crop, resample)[0]

        if sample.mask_from_alpha:
            with self.sources[sample.dataset].open(sample.item) as fp:
                out["mask"] = mask_tensor(aligned(load_mask(fp, from_alpha=True), Image.Resampling.NEAREST))
        for c in sample.companions:
            if c.clip is not None and indices is not None:  # a mask or control clip: the target's frames, aligned
                out.update(self._companion_clip(c, indices, aligned))
                continue
            with self.sources[c.source].open(c.item) as fp:
                if c.kind == "mask":
                    out["mask"] = mask_tensor(aligned(load_mask(fp), Image.Resampling.NEAREST))
                    continue
                if c.bucket is not None:  # a reference keeping its own aspect ratio
                    image = resize_and_crop(load_rgb(fp, cover=c.bucket), c.bucket, "center", rng)[0]
                else:
                    image = aligned(load_rgb(fp), Image.Resampling.LANCZOS)
            if c.kind == "reference":
                out.setdefault("reference_pixels", []).append(to_tensor(image))
            else:
                out["control_pixels"] = to_tensor(image)
        if indices is not None:  # a still mask or control of a clip holds for each of its frames
            for key in ("mask", "control_pixels"):
                if key in out and out[key].ndim == 3:
                    out[key] = out[key].unsqueeze(1).expand(-1, len(indices), -1, -1).contiguous()
        return out

    def _companion_clip(self, c, indices: list[int], aligned) -> dict[str, torch.Tensor]:
        """A clip's mask or control clip: the same source frames as its target's window, each brought to the
        target's bucket and crop box: ``mask`` (1, F, H, W) or ``control_pixels`` (3, F, H, W)."""
        animated = PurePosixPath(c.item.key).suffix.lower() in ANIMATED_EXTENSIONS
        if c.kind == "mask":
            def fit(frame: Image.Image) -> Image.Image:
                return aligned(frame.convert("L"), Image.Resampling.NEAREST)
        else:
            def fit(frame: Image.Image) -> Image.Image:
                return aligned(frame.convert("RGB"), Image.Resampling.LANCZOS)
        with self.sources[c.source].open(c.item) as fp:
            frames = (decode_animation if animated else decode)(fp, c.clip, indices, fit)
        if c.kind == "mask":
            return {"mask": torch.stack([mask_tensor(f) for f in frames], dim=1)}
        return {"control_pixels": torch.stack([to_tensor(f) for f in frames], dim=1)}

    def _load(self, index: int, epoch: int) -> dict[str, Any]:
        sample = self.samples[index]
        if self.latent_keys is not None:
            entry = self._read(self.latents, self.latent_keys[index], lambda: self._encode_image(index))
            out = {"encoded": entry["encoded"], "crop_top_left": tuple(entry["crop_top_left"].tolist())}
            refs = [entry[f"reference_{i}"] for i in range(sum(c.kind == "reference" for c in sample.companions))]
            out.update({"reference_encoded": refs} if refs else {})
            out.update({k: entry[n] for k, n in (("control_encoded", "control"), ("mask", "mask")) if n in entry})
            if refs and self.reference_pixels:  # the family reads them too (a vision-language text encoder)
                out["reference_pixels"] = self.paired(index, epoch=0)["reference_pixels"]
            rng = random.Random(f"{self.seed}:{epoch}:{index}")  # cached crops are never random ones
        elif sample.companions or sample.mask_from_alpha:
            out = self.paired(index, epoch)
            out["crop_top_left"], rng = out.pop("crop"), out.pop("rng")
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
        # as the cache fill encodes it (cached crops are not random)
        return encode_entries([self.paired(index, epoch=0)], self.encoders["encode_pixels"])[0]

    def _encode_caption(self, caption: str) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            cond = self.encoders["encode_prompts"]([caption])
        return {k: v[0].float().cpu() for k, v in cond.items()}

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        peers = self.by_bucket[self.samples[index].group]
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
    for key in ("reference_pixels", "reference_encoded"):  # a list by slot, each (B, C, h, w): one group a batch
        if key in items[0]:
            batch[key] = [torch.stack(slot) for slot in zip(*(it[key] for it in items), strict=True)]
    for key in ("mask", "control_pixels", "control_encoded"):  # (B, 1 | C, h, w)
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    return batch


def encode_entries(paired: list[dict[str, Any]], encode) -> list[dict[str, torch.Tensor]]:
    """Latent-cache entries for samples of one group (``BucketedImageDataset.paired`` of each): the target's
    encoding and crop, each reference's and the control image's encoding, and the mask averaged down to the
    encoding's grid ("area": a latent's weight is the share of its pixels that train)."""
    encoded = encode(torch.stack([p["pixels"] for p in paired])).float().cpu()  # (b, 2C, h, w)
    entries = [{"encoded": e, "crop_top_left": torch.tensor(p["crop"])} for e, p in zip(encoded, paired, strict=True)]
    for slot in range(len(paired[0].get("reference_pixels", []))):
        refs = encode(torch.stack([p["reference_pixels"][slot] for p in paired])).float().cpu()
        for entry, ref in zip(entries, refs, strict=True):
            entry[f"reference_{slot}"] = ref
    if "control_pixels" in paired[0]:
        controls = encode(torch.stack([p["control_pixels"] for p in paired])).float().cpu()
        for entry, control in zip(entries, controls, strict=True):
            entry["control"] = control
    if "mask" in paired[0]:
        masks = mask_on_grid(torch.stack([p["mask"] for p in paired]), encoded.shape[2:])  # a clip's packed in time
        for entry, mask in zip(entries, masks, strict=True):
            entry["mask"] = mask
    return entries
