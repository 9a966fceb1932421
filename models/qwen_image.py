"""Qwen-Image (Qwen/Qwen-Image, Qwen/Qwen-Image-2512): a 20 B rectified-flow MMDiT of 60 double-stream blocks,
conditioned on Qwen2.5-VL-7B's last hidden states, over a Wan-style causal 3-D VAE's latents.

- The prompt goes into the pipeline's system template; Qwen2.5-VL runs with its attention mask and its *last*
  hidden states are kept for the real tokens only, less the template's first 34 tokens
  (``prompt_template_encode_start_idx``), cut to ``max_sequence_length`` (512, the pipeline's default).
  Prompts differ in length: the pipeline pads a batch to its longest with zeros and hands the transformer
  ``encoder_hidden_states_mask`` (None when nothing is padding). Here they are padded to the fixed
  ``max_sequence_length`` with their mask, so the cache and caption dropout (to the empty prompt's embeddings
  and mask) work on fixed shapes; ``denoise`` cuts a batch back to its longest prompt, which is what the
  pipeline would have padded it to (text RoPE positions count from the first text token, so the padding
  length changes nothing else).
- The VAE encodes one-frame videos (B, 3, 1, H, W) into 16 channels at 1/8 size; latents are normalised per
  channel by the VAE config's ``latents_mean`` / ``latents_std``, exactly as the pipeline undoes it before
  decoding, not by a scalar scale. They are 2x2-packed into tokens like Flux's; the transformer gets
  ``img_shapes`` (frames, rows, columns of tokens) for its RoPE instead of ids.
- The transformer sees sigma in [0, 1] (``timestep / 1000``), no guidance embedding. Sigmas are shifted by the
  image's sequence length (``use_dynamic_shifting``: mu 0.5..0.9 over 256..8192 tokens, Qwen-Image's scheduler;
  its ``shift_terminal`` only rescales the sampling ladder); ``model.flow_shift`` overrides it.
- Sampling is real CFG (``true_cfg_scale`` with a negative prompt, "" by default, the prompt caption dropout
  trains), with the pipeline's rescale of the guided prediction back to the conditional one's norm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from models.base import DiffusionModule, lazy_class
from models.flux import dynamic_shift, pack, unpack

# QwenImagePipeline's ``prompt_template_encode`` and ``prompt_template_encode_start_idx`` (instance attributes
# there, so copied; tests/test_qwen_image.py checks they still agree), and its tokenizer's cut.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 34
TOKENIZER_MAX_LENGTH = 1024

# Qwen/Qwen-Image's scheduler/scheduler_config.json (Qwen-Image-2512's is the same)
QWEN_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_FFN = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
_MODULATION = ("img_mod.1", "txt_mod.1")


@dataclasses.dataclass
class QwenImageOptions:
    max_sequence_length: int = 512  # prompt tokens after the template, QwenImagePipeline's default (at most 1024)


def prompt_embeds(tokenizer, encoder, captions: Sequence[str], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """QwenImagePipeline's prompt embeddings, each row zero-padded to ``max_length``: the last hidden states
    (B, max_length, D) of the real tokens after the template's first ``TEMPLATE_TOKENS``, and their mask
    (B, max_length), 1 for those tokens."""
    tokens = tokenizer(
        [PROMPT_TEMPLATE.format(c) for c in captions],
        max_length=TOKENIZER_MAX_LENGTH + TEMPLATE_TOKENS,
        padding=True,
        truncation=True,
        return_tensors="pt",
    ).to(device)
    hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
    last = hidden.hidden_states[-1]  # (B, T, D), T: the batch's longest templated prompt
    out = last.new_zeros(len(captions), max_length, last.shape[-1])
    mask = torch.zeros(len(captions), max_length, dtype=torch.long, device=last.device)
    for i, (row, real) in enumerate(zip(last, tokens.attention_mask.bool(), strict=True)):
        kept = row[real][TEMPLATE_TOKENS : TEMPLATE_TOKENS + max_length]  # the pipeline's split, drop and cut
        out[i, : len(kept)] = kept
        mask[i, : len(kept)] = 1
    return out, mask


class QwenImageModule(DiffusionModule):
    pipeline_class = lazy_class("diffusers.QwenImagePipeline")
    denoiser_name = "transformer"
    denoiser_timestep_scale = 1.0  # QwenImagePipeline passes sigma itself
    noise_schedule = "flow"
    pixel_multiple = 16  # the VAE's 8x, then 2x2 packing
    license = "apache-2.0"
    Options = QwenImageOptions
    components = {
        "transformer": "diffusers.QwenImageTransformer2DModel",
        "vae": "diffusers.AutoencoderKLQwenImage",
        "text_encoder": "transformers.Qwen2_5_VLForConditionalGeneration",
        "tokenizer": "transformers.Qwen2Tokenizer",
    }
    # Image and text attention projections, as ai-toolkit's and SimpleTuner's Qwen-Image LoRAs; "all" adds the
    # two MLPs and the per-block modulation linears.
    default_lora_targets = _ATTENTION
    fsdp_blocks = ("QwenImageTransformerBlock",)
    lora_target_presets = {"attention": _ATTENTION, "attention+ffn": _ATTENTION + _FFN, "all": _ATTENTION + _FFN + _MODULATION}

    @classmethod
    def card_notes(cls, model_cfg) -> list[str]:
        tokens = (model_cfg.get("options") or {}).get("max_sequence_length", 512)
        return [
            "Qwen-Image samples with real classifier-free guidance: pass `true_cfg_scale` (4.0 is the usual value) "
            "and a `negative_prompt` (`\" \"` or `\"\"` when there is nothing to avoid); without a negative prompt the "
            f"pipeline runs unguided. Sample with `max_sequence_length={tokens}`, the prompt length it was trained with."
        ]

    # ---- latents: one-frame videos, normalised per channel ------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE config's per-channel ``latents_mean`` and ``latents_std``, shaped (1, C, 1, 1) like ``like``."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the posterior's mean and log-variance (B, 32, H/8, W/8) of the image as a
        one-frame video, the frame axis dropped for the cache."""
        frames = pixels.to(self.vae.device, self.vae_dtype)[:, :, None]  # (B, 3, 1, H, W)
        return self.vae.encode(frames).latent_dist.parameters[:, :, 0]

    def model_inputs(self, encoded: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample, normalised as QwenImagePipeline un-normalises before decoding:
        (z - latents_mean) / latents_std, per channel. (B, 16, H/8, W/8)"""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents = DiagonalGaussianDistribution(encoded.to(self.device)).sample(generator=generator)
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    def decode_latents(self, pipe, latents: torch.Tensor):
        """Normalised latents (B, 16, 1, h, w) -> a PIL image, as the pipeline decodes them."""
        latents = latents.to(self.vae.device, self.vae_dtype)[:, :, 0]  # (B, 16, h, w)
        mean, std = self._latent_stats(latents)
        image = self.vae.decode((latents * std + mean)[:, :, None]).sample[:, :, 0]  # (B, 3, H, W)
        return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]

    # ---- conditioning and the denoiser call -----------------------------------------------------------------
    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, mask = prompt_embeds(self.tokenizer, self.text_encoder, captions, self.options.max_sequence_length, self.device)
        return {"prompt_embeds": embeds, "prompt_mask": mask}  # (B, L, D), (B, L)

    flow_shift_for = dynamic_shift  # by the image's sequence length, where the scheduler says so

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        dtype, (b, _, h, w) = self.denoiser_dtype, noisy.shape
        mask = cond["prompt_mask"].to(self.device)  # (B, L)
        longest = int(mask.sum(dim=1).max())  # the pipeline pads a batch to its longest prompt
        mask = mask[:, :longest]
        out = self.transformer(
            hidden_states=pack(noisy.to(dtype)),  # (B, h/2 * w/2, 64)
            timestep=timesteps / self.noise.num_timesteps,  # sigma in [0, 1], as QwenImagePipeline passes it
            encoder_hidden_states=cond["prompt_embeds"][:, :longest].to(self.device, dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # the pipeline's None: no padding
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack(out, h, w)  # (B, 16, h, w)

    @torch.no_grad()
    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        """Validation's ``guidance_scale`` is the pipeline's ``true_cfg_scale`` (its ``guidance_scale`` is for
        guidance-distilled checkpoints, which Qwen-Image is not); above 1 the negative prompt ("" when none is
        set) is its unconditional pass."""
        scale = kwargs.pop("guidance_scale", 1.0)
        negative = kwargs.pop("negative_prompt", None)
        kwargs.update(true_cfg_scale=scale, negative_prompt=(negative or "") if scale > 1 else None)
        with autocast or nullcontext():
            tokens = pipe(prompt, output_type="latent", max_sequence_length=self.options.max_sequence_length, **kwargs).images
        latents = pipe._unpack_latents(tokens, kwargs["height"], kwargs["width"], pipe.vae_scale_factor)  # (B, 16, 1, h, w)
        with torch.autocast(self.device.type, enabled=False):
            return self.decode_latents(pipe, latents)

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        import diffusers

        from models import tiny

        torch.manual_seed(seed)
        tokenizer = tiny.qwen_tokenizer()
        transformer = diffusers.QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,  # 16 latent channels x a 2x2 patch
            out_channels=16,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # the text encoder's width
            axes_dims_rope=(4, 6, 6),  # frame, row, column: sums to the head dim
        )
        vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
        return cls.pipeline_class(
            transformer=transformer,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
            vae=vae,  # the real latents_mean / latents_std (the class defaults are Qwen-Image's)
            text_encoder=tiny_text_encoder(tokenizer),
            tokenizer=tokenizer,
        )


def tiny_text_encoder(tokenizer):
    """A tiny random Qwen2.5-VL (two text layers of width 32, a one-block vision tower), its special token ids
    those of ``tokenizer`` and its multimodal RoPE split over a head of 16 as the real one's over 128."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0]),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)
