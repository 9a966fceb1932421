"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, the UNet conditioned on its last hidden state.

SD 2.x differs only in its scheduler config (``prediction_type: v_prediction`` for the 768-v models),
which the base reads, so both use this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

from models.base import DiffusionModule


def tokenize(tokenizer, captions: Sequence[str], device: torch.device) -> torch.Tensor:
    """Token ids padded and truncated to the tokenizer's context length. Shape (B, 77)."""
    ids = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


class SDModule(DiffusionModule):
    pipeline_class = StableDiffusionPipeline

    def load_components(self, path: str, load_kwargs: dict) -> dict[str, Any]:
        from transformers import CLIPTextModel, CLIPTokenizer

        return {
            "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", **self.unet_load_kwargs(load_kwargs)),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **load_kwargs),
            "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **load_kwargs),
            "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=load_kwargs["revision"]),
        }

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = tokenize(self.tokenizer, captions, self.device)
        return {"encoder_hidden_states": self.text_encoder(ids)[0]}  # (B, 77, D)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        hidden = cond["encoder_hidden_states"].to(self.unet_dtype)
        return self.unet(noisy.to(self.unet_dtype), timesteps, encoder_hidden_states=hidden).sample

    def pipeline_components(self) -> dict[str, Any]:
        return {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "unet": self.unet,
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }
