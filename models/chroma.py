"""Chroma (lodestones/Chroma1-HD): a Flux.1-schnell-derived rectified-flow MMDiT, conditioned on T5 alone.

- No CLIP, no pooled projection and no guidance embedding: the per-block modulations come from the timestep
  alone, through the transformer's own small "approximator" network (``distilled_guidance_layer``).
- The prompt is T5's hidden states, computed **with** the tokenizer's attention mask (Flux computes them
  without), and the transformer gets an attention mask over the text tokens that keeps every real token and
  the *first* padding token (``ChromaPipeline._get_t5_prompt_embeds``), extended with ones for the image
  tokens. The mask is part of the cached conditioning, so a dropped caption gets the empty prompt's mask.
- Latents are Flux's (16 channels, shifted and scaled, 2x2-packed into tokens; models/flux.py's helpers), the
  transformer sees sigma in [0, 1] (``timestep / 1000``), text ids are zeros, and sigmas are shifted by the
  image's sequence length when the checkpoint's scheduler says so (``use_dynamic_shifting``), as the pipeline
  does; ``model.flow_shift`` overrides it.
- Sampling is real classifier-free guidance (``guidance_scale`` > 1 runs the transformer a second time on the
  negative prompt, "" by default), so validation's negative prompt means what it says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from models.base import DiffusionModule, lazy_class
from models.encoders import t5_with_mask
from models.flux import DEV_SCHEDULER, dynamic_shift, image_ids, pack, sample_packed, unpack

# Chroma's blocks are Flux's without the modulation linears (its norms are "pruned": the approximator
# supplies their scales and shifts), so there is no norm target.
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_FFN = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")


@dataclasses.dataclass
class ChromaOptions:
    t5_max_length: int = 512  # T5 tokens per prompt, ChromaPipeline's default max_sequence_length


def transformer_text_mask(tokenizer_mask: torch.Tensor) -> torch.Tensor:
    """The tokenizer's mask (B, L) -> the transformer's text mask (B, L) as ChromaPipeline builds it: every
    real token and the first padding token kept (1.0), the rest 0.0."""
    lengths = tokenizer_mask.sum(dim=1, keepdim=True)  # (B, 1): real tokens, </s> included
    positions = torch.arange(tokenizer_mask.shape[1], device=tokenizer_mask.device)[None, :]  # (1, L)
    return (positions <= lengths).float()


class ChromaModule(DiffusionModule):
    pipeline_class = lazy_class("diffusers.ChromaPipeline")
    denoiser_name = "transformer"
    denoiser_timestep_scale = 1.0  # ChromaPipeline passes sigma itself
    noise_schedule = "flow"
    pixel_multiple = 16  # the VAE's 8x, then 2x2 packing
    license = "apache-2.0"
    Options = ChromaOptions
    components = {
        "transformer": "diffusers.ChromaTransformer2DModel",
        "vae": "diffusers.AutoencoderKL",
        "text_encoder": "transformers.T5EncoderModel",
        "tokenizer": "transformers.T5TokenizerFast",
    }
    # Attention of both the double-stream and the single-stream blocks, as for Flux.
    default_lora_targets = _ATTENTION
    fsdp_blocks = ("ChromaTransformerBlock", "ChromaSingleTransformerBlock")
    lora_target_presets = {"attention": _ATTENTION, "attention+ffn": _ATTENTION + _FFN, "all": _ATTENTION + _FFN}

    @classmethod
    def card_notes(cls, model_cfg) -> list[str]:
        tokens = (model_cfg.get("options") or {}).get("t5_max_length", 512)
        return [
            "Chroma samples with real classifier-free guidance: `guidance_scale` above 1 runs the model a second "
            f"time on `negative_prompt` (\"\" by default). Sample with `max_sequence_length={tokens}`, the T5 length "
            "it was trained with."
        ]

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        # T5 sees the tokenizer's mask; the transformer later sees the pipeline's own (one padding token more)
        hidden, mask = t5_with_mask(self.tokenizer, self.text_encoder, captions, self.options.t5_max_length, self.device)
        return {"prompt_embeds": hidden, "attention_mask": transformer_text_mask(mask)}  # (B, L, D_t5), (B, L)

    flow_shift_for = dynamic_shift  # by the image's sequence length, where the scheduler says so

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        dtype, (b, _, h, w) = self.denoiser_dtype, noisy.shape
        prompt = cond["prompt_embeds"].to(dtype)  # (B, L, D_t5)
        # The text mask, then ones for the (h/2 * w/2) image tokens: ChromaPipeline._prepare_attention_mask.
        # Like the pipeline's, it is a float 0/1 mask, which the attention adds to its scores.
        image = torch.ones(b, (h // 2) * (w // 2), device=self.device, dtype=dtype)
        mask = torch.cat([cond["attention_mask"].to(self.device, dtype), image], dim=1)  # (B, L + h/2 * w/2)
        out = self.transformer(
            hidden_states=pack(noisy.to(dtype)),  # (B, h/2 * w/2, 64)
            timestep=timesteps / self.noise.num_timesteps,  # sigma in [0, 1], as ChromaPipeline passes it
            encoder_hidden_states=prompt,
            txt_ids=torch.zeros(prompt.shape[1], 3, device=self.device, dtype=dtype),
            img_ids=image_ids(h, w, self.device, dtype),
            attention_mask=mask,
            return_dict=False,
        )[0]
        return unpack(out, h, w)  # (B, 16, h, w)

    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        """The negative prompt is kept: it is the unconditional half of Chroma's real CFG."""
        return sample_packed(self, pipe, prompt, autocast, **kwargs)

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        import diffusers
        from transformers import T5EncoderModel

        from models import tiny

        torch.manual_seed(seed)
        transformer = diffusers.ChromaTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels x a 2x2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5's width
            axes_dims_rope=(4, 4, 8),  # sums to the head dim
            approximator_num_channels=16,
            approximator_hidden_dim=32,
            approximator_layers=1,
        )
        return cls.pipeline_class(
            transformer=transformer,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER),  # Chroma1-HD's is Flux dev's
            vae=tiny.vae16(shift_factor=0.1159, scaling_factor=0.3611),  # Flux's VAE, shift and scale
            text_encoder=T5EncoderModel(tiny.t5_config(32)),
            tokenizer=tiny.t5_tokenizer(model_max_length=512),
        )
