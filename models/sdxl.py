"""SDXL: two CLIP text encoders, pooled embeddings and micro-conditioning time ids.

Prompt embeddings are the penultimate hidden states of both encoders, concatenated on the feature
axis; the pooled projection of the second encoder and six ``add_time_ids`` (original size, crop
top-left and target size, each (h, w)) go in through ``added_cond_kwargs``. Podell et al. 2023, sec. 2.2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

from models.base import DiffusionModule
from models.sd import tokenize


class SDXLModule(DiffusionModule):
    pipeline_class = StableDiffusionXLPipeline
    vae_in_fp32 = True  # the original SDXL VAE produces NaNs in fp16

    def load_components(self, path: str, load_kwargs: dict) -> dict[str, Any]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        revision = load_kwargs["revision"]
        return {
            "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", **self.unet_load_kwargs(load_kwargs)),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **load_kwargs),
            "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **load_kwargs),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", **load_kwargs
            ),
            "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
            "tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision),
        }

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        hidden = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(tokenize(tokenizer, captions, self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # (B, 77, D_i)
        prompt_embeds = torch.cat(hidden, dim=-1)  # (B, 77, D_1 + D_2)
        pooled = out.text_embeds  # (B, D_2), from the second encoder
        # The SDXL pipeline's unconditional branch is all zeros (force_zeros_for_empty_prompt), so a
        # dropped caption trains on zeros too: the model learns the very input it sees without a prompt.
        keep = torch.tensor([bool(c) for c in captions], device=self.device, dtype=prompt_embeds.dtype)
        return {"prompt_embeds": prompt_embeds * keep[:, None, None], "pooled": pooled * keep[:, None]}

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        dtype = self.unet_dtype
        # (B, 6): original (h, w), crop top-left (y, x), target (h, w), per sample.
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
        added = {"text_embeds": cond["pooled"].to(dtype), "time_ids": time_ids.to(self.device, dtype)}
        return self.unet(
            noisy.to(dtype), timesteps, encoder_hidden_states=cond["prompt_embeds"].to(dtype), added_cond_kwargs=added
        ).sample

    def pipeline_components(self) -> dict[str, Any]:
        return {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "tokenizer": self.tokenizer,
            "tokenizer_2": self.tokenizer_2,
            "unet": self.unet,
        }
