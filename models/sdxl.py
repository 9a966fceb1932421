"""SDXL: two CLIP text encoders, pooled embeddings and micro-conditioning time ids.

Prompt embeddings are the penultimate hidden states of both encoders, concatenated on the feature
axis; the pooled projection of the second encoder and six ``add_time_ids`` (original size, crop
top-left and target size, each (h, w)) go in through ``added_cond_kwargs``. Podell et al. 2023, sec. 2.2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.adapters import CLIP_ATTENTION
from models.base import DiffusionModule, lazy_class
from models.sd import tokenize


class SDXLModule(DiffusionModule):
    pipeline_class = lazy_class("diffusers.StableDiffusionXLPipeline")
    denoiser_name = "unet"
    noise_schedule = "ddpm"
    license = "openrail++"
    kohya_base_versions = {"sdxl": "sdxl_base_v1-0"}
    text_encoder_lora_targets = {"text_encoder": CLIP_ATTENTION, "text_encoder_2": CLIP_ATTENTION}
    vae_in_fp32 = True  # the original SDXL VAE produces NaNs in fp16
    components = {
        "unet": "diffusers.UNet2DConditionModel",
        "vae": "diffusers.AutoencoderKL",
        "text_encoder": "transformers.CLIPTextModel",
        "text_encoder_2": "transformers.CLIPTextModelWithProjection",
        "tokenizer": "transformers.CLIPTokenizer",
        "tokenizer_2": "transformers.CLIPTokenizer",
    }
    fsdp_blocks = ("BasicTransformerBlock", "ResnetBlock2D")  # trainer=fsdp shards the UNet by these

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
        dtype = self.denoiser_dtype
        # (B, 6): original (h, w), crop top-left (y, x), target (h, w), per sample.
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
        added = {"text_embeds": cond["pooled"].to(dtype), "time_ids": time_ids.to(self.device, dtype)}
        return self.unet(
            noisy.to(dtype), timesteps, encoder_hidden_states=cond["prompt_embeds"].to(dtype), added_cond_kwargs=added
        ).sample

    @classmethod
    def tiny_pipeline(cls, family: str, seed: int = 0):
        import diffusers
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from models import tiny

        torch.manual_seed(seed)
        vae = diffusers.AutoencoderKL(**tiny.VAE)
        unet = tiny_unet()
        return cls.pipeline_class(
            vae=vae,
            text_encoder=CLIPTextModel(tiny.clip_text_config()),
            text_encoder_2=CLIPTextModelWithProjection(tiny.clip_text_config()),
            tokenizer=tiny.clip_tokenizer(),
            tokenizer_2=tiny.clip_tokenizer(),
            unet=unet,
            scheduler=diffusers.EulerDiscreteScheduler(**tiny.SCHEDULER, timestep_spacing="leading"),
        )


def tiny_unet(**overrides):
    """SDXL's tiny UNet: micro-conditioning with pooled text embeds (32) + six time ids of 8 each, as SDXL's
    add_embedding expects. ``overrides`` adapt it to a family built on SDXL (Kolors)."""
    import diffusers

    from models import tiny

    config = dict(
        **tiny.UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
    )
    return diffusers.UNet2DConditionModel(**{**config, **overrides})

