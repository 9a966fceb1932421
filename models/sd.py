"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, the UNet conditioned on its last hidden state.

SD 2.x differs only in its scheduler config (``prediction_type: v_prediction`` for the 768-v models),
which the noise schedule reads, so both use this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from models.adapters import CLIP_ATTENTION
from models.base import DiffusionModule, lazy_class


def tokenize(tokenizer, captions: Sequence[str], device: torch.device, max_length: int | None = None) -> torch.Tensor:
    """Token ids padded and truncated to ``max_length`` (the tokenizer's context length). Shape (B, L)."""
    ids = tokenizer(
        list(captions),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


class SDModule(DiffusionModule):
    pipeline_class = lazy_class("diffusers.StableDiffusionPipeline")
    denoiser_name = "unet"
    noise_schedule = "ddpm"
    license = "creativeml-openrail-m"
    kohya_base_versions = {"sd15": "sd_v1", "sd2": "sd_v2"}
    text_encoder_lora_targets = {"text_encoder": CLIP_ATTENTION}
    components = {
        "unet": "diffusers.UNet2DConditionModel",
        "vae": "diffusers.AutoencoderKL",
        "text_encoder": "transformers.CLIPTextModel",
        "tokenizer": "transformers.CLIPTokenizer",
    }
    fsdp_blocks = ("BasicTransformerBlock", "ResnetBlock2D")  # trainer=fsdp shards the UNet by these

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = tokenize(self.tokenizer, captions, self.device)
        return {"encoder_hidden_states": self.text_encoder(ids)[0]}  # (B, 77, D)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        hidden = cond["encoder_hidden_states"].to(self.denoiser_dtype)
        return self.unet(noisy.to(self.denoiser_dtype), timesteps, encoder_hidden_states=hidden).sample

    def pipeline_components(self) -> dict[str, Any]:
        return {
            **super().pipeline_components(),
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }

    @classmethod
    def tiny_pipeline(cls, family: str, seed: int = 0):
        import diffusers
        from transformers import CLIPTextModel

        from models import tiny

        torch.manual_seed(seed)
        vae = diffusers.AutoencoderKL(**tiny.VAE)
        if family == "sd2":  # SD 2.x (768-v) predicts velocity; the scheduler config carries it, as on the Hub
            unet = tiny.sd_unet(cross_attention_dim=32, linear_proj=True)
            scheduler = diffusers.DDIMScheduler(
                **tiny.SCHEDULER, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"
            )
        else:
            unet = tiny.sd_unet(cross_attention_dim=32, linear_proj=False)
            scheduler = diffusers.PNDMScheduler(**tiny.SCHEDULER, skip_prk_steps=True)
        return cls.pipeline_class(
            vae=vae,
            text_encoder=CLIPTextModel(tiny.clip_text_config()),
            tokenizer=tiny.clip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
