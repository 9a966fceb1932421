"""LTX-Video (Lightricks/LTX-Video, 0.9.x): a 2 B rectified-flow video DiT of 28 blocks over the LTX VAE's
128-channel latents (32x spatial, 8x temporal compression: clips of 8k+1 frames), conditioned on T5-XXL.

- Prompts are LTXPipeline's ``_get_t5_prompt_embeds``: padded to ``max_sequence_length`` (128, the pipeline's
  default) and run through T5 *without* the attention mask (the padding's states are whatever T5 makes of the pad
  tokens); the mask goes to the transformer as ``encoder_attention_mask`` instead. Fixed shapes, so the cache and
  caption dropout need nothing more.
- Latents are normalised per channel by the VAE's ``latents_mean`` / ``latents_std`` *buffers* (stored with its
  weights, not in its config) and ``scaling_factor``: ``(z - mean) * scaling_factor / std``, the pipeline's
  ``_normalize_latents``, undone by ``_denormalize_latents`` before decoding. The posterior's log-variance is one
  channel the encoder repeats. They are packed into tokens as ``_pack_latents`` does (the transformer's
  ``patch_size`` and ``patch_size_t``, 1 and 1 for 0.9.x: a token a latent pixel).
- The transformer gets the timestep as the pipeline does (the scheduler's, sigma x 1000), the latent
  ``num_frames``/``height``/``width`` for its rotary positions, and ``rope_interpolation_scale``
  ``(temporal compression / frame_rate, spatial, spatial)``: the frame rate conditions the positions in time
  (``options.frame_rate``, the pipeline's 25 by default; sample with the same).
- Sigmas are shifted by the clip's sequence length (latent frames x rows x columns) as the pipeline's
  ``calculate_shift`` with the scheduler's ``base/max_image_seq_len`` and ``base/max_shift`` (LTX's: mu 0.95..2.05
  over 1024..4096 tokens, linear and not clamped, as the pipeline computes it); ``model.flow_shift`` overrides it.
- A still image is a one-frame clip ((B, 3, H, W) batches get a frame axis). Validation samples
  ``options.validation_frames`` frames at the trained frame rate and returns them all (validation writes the
  .mp4 and a frame strip); the pipeline returns ``.frames``, not ``.images``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from models.base import DiffusionModule, lazy_class

# Lightricks/LTX-Video's scheduler/scheduler_config.json (0.9.0 to 0.9.7)
LTX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.95,
    max_shift=2.05,
    base_image_seq_len=1024,
    max_image_seq_len=4096,
    shift_terminal=0.1,
)

_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
_CROSS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
_FFN = ("ff.net.0.proj", "ff.net.2")


@dataclasses.dataclass
class LTXVideoOptions:
    max_sequence_length: int = 128  # T5 tokens, padded to this (LTXPipeline's default)
    frame_rate: float = 25.0  # the clips' frames per second, in the rotary positions (LTXPipeline's default 25)
    validation_frames: int = 9  # frames of a validation clip (8k + 1)


def calculate_shift(seq_len: int, config) -> float:
    """LTXPipeline's mu: linear in the sequence length through (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift), with the pipeline's defaults for keys the scheduler lacks."""
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (hi - lo)
    return seq_len * slope + base - slope * lo


def pack(latents: torch.Tensor, p: int, pt: int) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, F/pt * H/p * W/p, C * pt * p * p), LTXPipeline._pack_latents."""
    b, c, f, h, w = latents.shape
    x = latents.reshape(b, c, f // pt, pt, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack(tokens: torch.Tensor, f: int, h: int, w: int, p: int, pt: int) -> torch.Tensor:
    """The inverse of ``pack``, LTXPipeline._unpack_latents (f, h, w: the token grid)."""
    x = tokens.reshape(tokens.shape[0], f, h, w, -1, pt, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class LTXVideoModule(DiffusionModule):
    pipeline_class = lazy_class("diffusers.LTXPipeline")
    denoiser_name = "transformer"
    noise_schedule = "flow"
    pixel_multiple = 32  # the VAE's 32x (LTXPipeline checks height and width % 32)
    video = True
    frame_multiple = 8  # clips of 8k + 1 frames (the VAE's causal 8x in time)
    license = "other"  # Lightricks' LTX-Video licence (the checkpoint's model card says which)
    license_note = "LTX-Video's weights are under Lightricks' own licence: read it before using the LoRA."
    Options = LTXVideoOptions
    components = {
        "transformer": "diffusers.LTXVideoTransformer3DModel",
        "vae": "diffusers.AutoencoderKLLTXVideo",
        "text_encoder": "transformers.T5EncoderModel",
        "tokenizer": "transformers.T5TokenizerFast",
    }
    # Self- and cross-attention projections, as diffusers' and SimpleTuner's LTX LoRAs ("to_k", "to_q", "to_v",
    # "to_out.0" in every attention); "all" adds the feed-forward.
    default_lora_targets = _ATTENTION + _CROSS
    fsdp_blocks = ("LTXVideoTransformerBlock",)
    lora_target_presets = {"self-attention": _ATTENTION, "attention": _ATTENTION + _CROSS, "all": _ATTENTION + _CROSS + _FFN}
    lora_load_snippet = "pipe.load_lora_weights({path!r})  # then pipe(prompt, num_frames=..., frame_rate=...).frames"

    @classmethod
    def card_notes(cls, model_cfg) -> list[str]:
        options = model_cfg.get("options") or {}
        return [
            f"Sample with `frame_rate={options.get('frame_rate', 25.0):g}` (the frame rate it was trained at conditions "
            f"the positions in time), `num_frames` of the form 8k+1, height and width multiples of 32 and "
            f"`max_sequence_length={options.get('max_sequence_length', 128)}`; the pipeline returns `.frames`."
        ]

    @classmethod
    def sampling_inputs(cls, height: int, width: int, pipe=None) -> dict:
        """A one-frame clip (an image, as the image demo and the caption task train) at the default frame rate:
        the pipeline's default is 161 frames."""
        return {"num_frames": 1, "frame_rate": LTXVideoOptions.frame_rate}

    # ---- latents -------------------------------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The VAE's per-channel ``latents_mean`` and ``latents_std`` buffers shaped (1, C, 1, 1, 1), and its
        ``scaling_factor``."""
        mean = self.vae.latents_mean.to(like.device, like.dtype).view(1, -1, 1, 1, 1)
        std = self.vae.latents_std.to(like.device, like.dtype).view(1, -1, 1, 1, 1)
        return mean, std, self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) clips or (B, 3, H, W) images (one-frame clips) in [-1, 1] -> the posterior's mean and
        log-variance (B, 2C, (F-1)/8 + 1, H/32, W/32)."""
        pixels = pixels if pixels.ndim == 5 else pixels[:, :, None]
        return self.vae.encode(pixels.to(self.vae.device, self.vae_dtype)).latent_dist.parameters

    def model_inputs(self, encoded: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample, normalised as LTXPipeline._normalize_latents: (z - mean) * scaling_factor / std."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents = DiagonalGaussianDistribution(encoded.to(self.device)).sample(generator=generator)
        mean, std, factor = self._latent_stats(latents)
        return (latents - mean) * factor / std

    def decode_latents(self, pipe, latents: torch.Tensor):
        """Normalised latents (B, C, f, h, w) -> the first clip's frames (PIL images; one frame: the image),
        decoded as the pipeline decodes (its decode_timestep 0 and no decode noise, for a timestep-conditioned
        VAE)."""
        latents = latents.to(self.vae.device, self.vae_dtype)
        mean, std, factor = self._latent_stats(latents)
        latents = latents * std / factor + mean
        timestep = latents.new_zeros(latents.shape[0]) if self.vae.config.timestep_conditioning else None
        video = self.vae.decode(latents, timestep, return_dict=False)[0]  # (B, 3, F, H, W)
        frames = pipe.video_processor.postprocess_video(video.float(), output_type="pil")[0]
        return frames if len(frames) > 1 else frames[0]

    # ---- conditioning and the denoiser call -----------------------------------------------------------------
    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """LTXPipeline._get_t5_prompt_embeds: (B, L, D) states of the padded prompt (T5 runs unmasked) and
        the mask (B, L) the transformer gets."""
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.options.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        embeds = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return {"prompt_embeds": embeds, "prompt_mask": tokens.attention_mask.to(self.device)}

    def rope_interpolation_scale(self) -> tuple[float, int, int]:
        """LTXPipeline's micro-condition: (temporal compression / frame rate, spatial, spatial)."""
        vae = self.vae
        return (vae.temporal_compression_ratio / self.options.frame_rate, vae.spatial_compression_ratio, vae.spatial_compression_ratio)

    def flow_shift_for(self, latents: torch.Tensor) -> float | None:
        """exp(mu), mu LTXPipeline's ``calculate_shift`` of latent frames x rows x columns; None for
        ``model.flow_shift`` or a scheduler without dynamic shifting."""
        config = self.noise.config
        if self.hparams.flow_shift is not None or not config.get("use_dynamic_shifting"):
            return None
        f, h, w = latents.shape[-3:]
        return math.exp(calculate_shift(f * h * w, config))

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        """(B, C, f, h, w) -> the velocity prediction of the same shape."""
        dtype, config = self.denoiser_dtype, self.transformer.config
        p, pt = config.patch_size, config.patch_size_t
        _, _, f, h, w = noisy.shape
        out = self.transformer(
            hidden_states=pack(noisy.to(dtype), p, pt),
            encoder_hidden_states=cond["prompt_embeds"].to(self.device, dtype),
            timestep=timesteps.to(self.device) * (1000 / self.noise.num_timesteps),  # the scheduler's sigma x 1000
            encoder_attention_mask=cond["prompt_mask"].to(self.device),
            num_frames=f // pt,
            height=h // p,
            width=w // p,
            rope_interpolation_scale=self.rope_interpolation_scale(),
            return_dict=False,
        )[0]
        return unpack(out, f // pt, h // p, w // p, p, pt)

    @torch.no_grad()
    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        """The frames of an ``options.validation_frames`` clip sampled at the trained frame rate."""
        height, width = kwargs["height"], kwargs["width"]
        frames = kwargs.pop("num_frames", self.options.validation_frames)
        kwargs.update(frame_rate=self.options.frame_rate, max_sequence_length=self.options.max_sequence_length)
        with autocast or nullcontext():
            tokens = pipe(prompt, num_frames=frames, output_type="latent", **kwargs).frames  # packed (B, N, C)
        config, vae = self.transformer.config, self.vae
        f = (frames - 1) // vae.temporal_compression_ratio + 1
        h, w = height // vae.spatial_compression_ratio, width // vae.spatial_compression_ratio
        latents = unpack(tokens, f // config.patch_size_t, h // config.patch_size, w // config.patch_size, config.patch_size, config.patch_size_t)
        with torch.autocast(self.device.type, enabled=False):
            return self.decode_latents(pipe, latents)

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        import diffusers
        from transformers import T5EncoderModel

        from models import tiny

        torch.manual_seed(seed)
        transformer = diffusers.LTXVideoTransformer3DModel(
            in_channels=16,  # the real 128 latent channels, tiny
            out_channels=16,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,
            num_layers=2,  # a block to find where a token is (relative RoPE only), one to use it (bench/learn.py)
            caption_channels=32,  # the text encoder's width
        )
        vae = diffusers.AutoencoderKLLTXVideo(  # 0.9.0's layout: 4x patches, then three 2x space-time steps
            latent_channels=16,
            block_out_channels=(8, 16, 16, 16),
            decoder_block_out_channels=(8, 16, 16, 16),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
        )
        return cls.pipeline_class(
            transformer=transformer,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER),
            vae=vae,
            text_encoder=T5EncoderModel(tiny.t5_config(d_model=32)),
            tokenizer=tiny.t5_tokenizer(model_max_length=128),
        )
