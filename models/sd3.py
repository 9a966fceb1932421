"""Stable Diffusion 3 and 3.5: an MMDiT transformer trained with rectified flow, three text encoders.

The prompt is CLIP-L's and CLIP-G's penultimate hidden states side by side (77 tokens, zero-padded to
T5's width), followed by T5-XXL's tokens; the pooled vector is both CLIPs' projections concatenated
(Esser et al. 2024, sec. 5.2). Without T5 (``model.options.use_t5=false``, or a checkpoint that ships
none) its part is zeros, as in the pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from models.adapters import CLIP_ATTENTION
from models.base import DiffusionModule, lazy_class
from models.sd import tokenize


@dataclasses.dataclass
class SD3Options:
    t5_max_length: int = 77  # T5 tokens per prompt: 77 for SD3 medium, 256 for SD3.5 (its preset sets it)
    use_t5: bool = True  # false: train without the 4.7 B-parameter T5 encoder (its embeddings are zeros)


class SD3Module(DiffusionModule):
    pipeline_class = lazy_class("diffusers.StableDiffusion3Pipeline")
    denoiser_name = "transformer"
    noise_schedule = "flow"
    pixel_multiple = 16  # the VAE's 8x, then 2x2 patches
    license = "other"  # the Stability AI Community License
    Options = SD3Options
    text_encoder_lora_targets = {"text_encoder": CLIP_ATTENTION, "text_encoder_2": CLIP_ATTENTION}  # not T5
    components = {
        "transformer": "diffusers.SD3Transformer2DModel",
        "vae": "diffusers.AutoencoderKL",
        "text_encoder": "transformers.CLIPTextModelWithProjection",
        "text_encoder_2": "transformers.CLIPTextModelWithProjection",
        "text_encoder_3": "transformers.T5EncoderModel",
        "tokenizer": "transformers.CLIPTokenizer",
        "tokenizer_2": "transformers.CLIPTokenizer",
        "tokenizer_3": "transformers.T5TokenizerFast",
    }
    # Both streams of every joint block: the image's attention and the text's added projections.
    default_lora_targets = (
        "to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out",
    )  # fmt: skip
    fsdp_blocks = ("JointTransformerBlock",)  # trainer=fsdp shards the MMDiT by its joint blocks

    def wanted(self, name: str) -> bool:
        return self.options.use_t5 or not name.endswith("_3")

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(tokenize(tokenizer, captions, self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # (B, 77, D_i)
            pooled.append(out.text_embeds)  # (B, P_i)
        clip = torch.cat(hidden, dim=-1)  # (B, 77, D_1 + D_2)
        width = self.transformer.config.joint_attention_dim
        if self.text_encoder_3 is not None:
            ids = tokenize(self.tokenizer_3, captions, self.device, self.options.t5_max_length)
            t5 = self.text_encoder_3(ids)[0]  # (B, L, D_t5)
        else:
            t5 = torch.zeros(len(captions), self.options.t5_max_length, width, device=self.device, dtype=clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))  # (B, 77, D_t5)
        return {"prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        # Validation encodes prompts as training did (the pipeline's default is 256 T5 tokens).
        return super().sample_image(pipe, prompt, autocast, max_sequence_length=self.options.t5_max_length, **kwargs)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        dtype = self.denoiser_dtype
        return self.transformer(
            hidden_states=noisy.to(dtype),  # (B, 16, h, w)
            timestep=timesteps,  # sigma * 1000
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),  # (B, 77 + L, D)
            pooled_projections=cond["pooled"].to(dtype),  # (B, P_1 + P_2)
            return_dict=False,
        )[0]

    @classmethod
    def tiny_pipeline(cls, family: str, seed: int = 0):
        import diffusers
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        from models import tiny

        torch.manual_seed(seed)
        vae = tiny.vae16(shift_factor=0.0609, scaling_factor=1.5305)  # SD3's shift and scale
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,  # T5's width; the two CLIPs' 32 + 32 are padded to it
            caption_projection_dim=32,
            pooled_projection_dim=64,  # both CLIPs' 32-wide projections
            pos_embed_max_size=32,
        )
        return cls.pipeline_class(
            transformer=transformer,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=vae,
            text_encoder=CLIPTextModelWithProjection(tiny.clip_text_config()),
            tokenizer=tiny.clip_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(tiny.clip_text_config()),
            tokenizer_2=tiny.clip_tokenizer(),
            text_encoder_3=T5EncoderModel(tiny.t5_config(64)),
            tokenizer_3=tiny.t5_tokenizer(),
        )
