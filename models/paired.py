"""The paired-data side of a family module: what a family declares of the companion images it consumes
(datamodules/pairs.py), its reference images' latents, and the loss mask. Mixed into ``DiffusionModule``.

Every family takes a ``mask`` (``model.masked_loss``): the base weights its loss by it. A family that consumes
references (an edit model: Kontext, Qwen-Image-Edit) or a control image declares it in ``conditioning_kinds``
and reads them in ``denoise`` through ``reference_latents``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

# What a family may declare in ``conditioning_kinds`` (a mask is every family's, through model.masked_loss).
CONSUMED_KINDS = ("reference", "control")


class PairedMixin:
    #: the companion kinds the family consumes besides the mask; each is required of its data (an edit family
    #: cannot train without its input images)
    conditioning_kinds: ClassVar[tuple[str, ...]] = ()
    #: how many references one target may have (Qwen-Image-Edit-Plus: 3)
    max_references: ClassVar[int] = 1
    #: a reference of another aspect ratio keeps its own bucket (Kontext packs any size of input); otherwise a
    #: reference goes through its target's bucket and crop box
    references_own_bucket: ClassVar[bool] = False
    #: batches carry the references' pixels even when their latents are cached (a vision-language text encoder
    #: reads the input image: Qwen-Image-Edit)
    reference_pixels_in_batch: ClassVar[bool] = False
    #: the prompt's encoding depends on the reference image, so it cannot be cached by caption (Qwen-Image-Edit)
    prompt_uses_references: ClassVar[bool] = False
    #: the family trains on video clips (B, 3, F, H, W); an image is then a 1-frame clip
    video: ClassVar[bool] = False
    #: a clip's frame count must be frame_multiple * k + 1 (Wan 4, LTX 8)
    frame_multiple: ClassVar[int] = 1
    #: the class that trains this family's control LoRA (``model.control=lora``), by dotted path; None: it has none
    control_class: ClassVar[str | None] = None

    @classmethod
    def max_references_for(cls, model_cfg) -> int:
        """How many references a target may have with this checkpoint (``model_cfg``: the settled ``cfg.model``);
        a family whose checkpoints differ (Qwen-Image-Edit vs -Plus) reads it there."""
        return cls.max_references

    @classmethod
    def data_requirements(cls) -> dict[str, Any]:
        """What the data module must know of this family before anything loads (tuner/run.py); a prompt read
        with its input image is encoded in the step, not cached by caption."""
        needs = {
            "references_own_bucket": cls.references_own_bucket,
            "reference_pixels": cls.reference_pixels_in_batch,
            "video": cls.video,
        }
        return {**needs, "cache_text_embeds": False} if cls.prompt_uses_references else needs

    def reference_inputs(self, encoded: torch.Tensor) -> torch.Tensor:
        """A reference image's encoding (``encode_pixels``: the VAE posterior's mean and log-variance) -> the
        latents the denoiser is handed: the posterior's mode, shifted and scaled, as the pipelines'
        ``_encode_vae_image`` (``sample_mode="argmax"``) compute it. (B, 2C, h, w) -> (B, C, h, w)."""
        mean = encoded.to(self.device).float().chunk(2, dim=1)[0]
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (mean - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def reference_latents(self, batch: dict) -> list[torch.Tensor]:
        """Each reference slot's latents (B, C, h_r, w_r): from the cache, or encoded from its pixels now."""
        if "reference_encoded" in batch:
            return [self.reference_inputs(e) for e in batch["reference_encoded"]]
        return [self.reference_inputs(self.encode_pixels(p)) for p in batch.get("reference_pixels", [])]

    def loss_mask(self, batch: dict, pred: torch.Tensor) -> torch.Tensor | None:
        """With ``model.masked_loss``: the batch's mask (white = train) averaged down to the prediction's grid,
        (B, 1, h, w) on its device; None otherwise. A latent's weight is the share of its pixels that train."""
        if not self.hparams.masked_loss:
            return None
        from datamodules.video import mask_on_grid

        mask = batch["mask"].to(pred.device, torch.float32)  # (B, 1, H, W), or (B, 1, F, H, W) for clips
        mask = mask_on_grid(mask, pred.shape[2:])
        return mask.unsqueeze(2) if pred.ndim == 5 and mask.ndim == 4 else mask  # a still mask: on every frame

