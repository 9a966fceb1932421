"""Flux.1 (dev and schnell): a rectified-flow MMDiT over 2x2-packed latent tokens, conditioned on CLIP's
pooled output and T5's hidden states.

- The loaded transformer's ``guidance_embeds`` tells dev (guidance-distilled: the guidance value goes in
  as an embedding, ``model.options.guidance`` when training) from schnell; there is no flag to get wrong.
- Latents (16 channels, shifted and scaled) are packed 2x2 into tokens; the image ids come from the
  batch's latent size, so every aspect bucket works. The transformer sees sigma in [0, 1], as
  ``FluxPipeline`` hands it (``timestep / 1000``).
- dev's scheduler shifts sigmas by the image's sequence length (``use_dynamic_shifting``: mu between
  ``base_shift`` and ``max_shift`` over ``base/max_image_seq_len``); schnell's shift is fixed. The shared
  ``model.flow_shift`` overrides both.
- schnell is also step-distilled: ``model.options.training_adapter`` (models/training_adapter.py) keeps a
  de-distilling LoRA on while training and out of validation samples and of everything the run writes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import torch

from models.adapters import CLIP_ATTENTION
from models.base import DiffusionModule, lazy_class
from models.sd import tokenize
from models.training_adapter import TrainingAdapterHooks

log = logging.getLogger(__name__)

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_FFN = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
_NORMS = ("norm1.linear", "norm1_context.linear", "norm.linear")


@dataclasses.dataclass
class FluxOptions:
    t5_max_length: int = 512  # T5 tokens per prompt: 512 for dev, 256 for schnell (its preset), as the pipelines use
    guidance: float = 1.0  # dev: the guidance embedding's value while training (SimpleTuner's 1.0); schnell has none
    # schnell: a LoRA that de-distills it while training (ostris/FLUX.1-schnell-training-adapter), so the run's LoRA
    # then samples on plain schnell at 4 steps: a .safetensors file, a folder holding one, or a Hub repo id
    training_adapter: str | None = None


UNDISTILLS = (
    "FLUX.1 [schnell] is step-distilled and this run trains it without a training adapter: the trained weights will "
    "undo the distillation (blurry samples at schnell's 1-4 steps); set "
    "model.options.training_adapter=ostris/FLUX.1-schnell-training-adapter"
)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch of latents becomes one token."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of ``pack``."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Positions of the packed tokens for RoPE: (h/2 * w/2, 3) rows of (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def dynamic_mu(seq_len: int, config: dict) -> float:
    """The Flux dev shift exponent mu for ``seq_len`` image tokens: linear between the scheduler config's
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    lo_len, hi_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return lo + (hi - lo) * (seq_len - lo_len) / (hi_len - lo_len)



def dynamic_shift(module, latents: torch.Tensor) -> float | None:
    """``flow_shift_for`` of a family whose checkpoint's scheduler may shift sigmas by the image's sequence length
    of 2x2 tokens (FLUX.1 dev, Chroma, Qwen-Image, Z-Image's config if it asks): None for ``model.flow_shift`` (the
    override) or a fixed shift in the scheduler."""
    config = module.noise.config
    if module.hparams.flow_shift is not None or not config.get("use_dynamic_shifting"):
        return None
    return math.exp(dynamic_mu((latents.shape[-2] // 2) * (latents.shape[-1] // 2), config))

class FluxModule(TrainingAdapterHooks, DiffusionModule):
    pipeline_class = lazy_class("diffusers.FluxPipeline")
    denoiser_name = "transformer"
    denoiser_timestep_scale = 1.0  # FluxPipeline passes sigma itself
    noise_schedule = "flow"
    pixel_multiple = 16  # the VAE's 8x, then 2x2 packing
    license = "other"  # dev: the FLUX.1 [dev] non-commercial licence; the flux-schnell preset sets apache-2.0
    Options = FluxOptions
    components = {
        "transformer": "diffusers.FluxTransformer2DModel",
        "vae": "diffusers.AutoencoderKL",
        "text_encoder": "transformers.CLIPTextModel",
        "text_encoder_2": "transformers.T5EncoderModel",
        "tokenizer": "transformers.CLIPTokenizer",
        "tokenizer_2": "transformers.T5TokenizerFast",
    }
    # Attention of both the double-stream and the single-stream blocks.
    default_lora_targets = _ATTENTION
    fsdp_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")  # trainer=fsdp shards by these
    lora_target_presets = {
        "attention": _ATTENTION,
        "attention+ffn": _ATTENTION + _FFN,
        "all": _ATTENTION + _FFN + _NORMS,
    }
    tiny_variants = ("flux-dev", "flux-schnell")
    text_encoder_lora_targets = {"text_encoder": CLIP_ATTENTION}  # CLIP; the pipeline loads none into T5
    control_class = "models.flux_control.FluxControlModule"  # model.control=lora: FluxControlPipeline's control LoRA

    # ---- the training adapter (models/training_adapter.py's hooks) ----------------------------------------
    def without_training_adapter(self) -> None:
        if not self.transformer.config.guidance_embeds:  # schnell: no guidance embedding
            log.warning(UNDISTILLS)

    @classmethod
    def card_notes(cls, model_cfg) -> list[str]:
        options = model_cfg.get("options") or {}
        spec, tokens = options.get("training_adapter"), options.get("t5_max_length", 256)
        if spec is not None:
            return [
                f"Trained with the training adapter `{spec}` active (it de-distills FLUX.1 [schnell] while training); "
                "the adapter is not part of these weights. Load them on plain FLUX.1 [schnell] and sample as schnell: "
                f"4 steps (1 to 4), `guidance_scale=0.0`, `max_sequence_length={tokens}`. The validation images were "
                "sampled that way, without the adapter."
            ]
        if is_schnell(model_cfg):
            return [
                "Warning: trained on step-distilled FLUX.1 [schnell] without a training adapter, so these weights "
                "undo the distillation: at schnell's 1 to 4 steps samples may come out blurry (more steps help). "
                "Retrain with `model.options.training_adapter=ostris/FLUX.1-schnell-training-adapter` to keep it."
            ]
        return []

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        pooled = self.text_encoder(tokenize(self.tokenizer, captions, self.device), output_hidden_states=False)
        ids = tokenize(self.tokenizer_2, captions, self.device, self.options.t5_max_length)
        t5 = self.text_encoder_2(ids, output_hidden_states=False)[0]  # (B, L, D_t5)
        return {"prompt_embeds": t5, "pooled": pooled.pooler_output}  # pooled: (B, D_clip)

    flow_shift_for = dynamic_shift  # by the image's sequence length, where the scheduler says so

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        dtype, (b, _, h, w) = self.denoiser_dtype, noisy.shape
        prompt = cond["prompt_embeds"].to(dtype)  # (B, L, D_t5)
        guidance = None
        if self.transformer.config.guidance_embeds:  # dev
            guidance = torch.full((b,), self.options.guidance, device=self.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack(noisy.to(dtype)),  # (B, h/2 * w/2, 64)
            timestep=timesteps / self.noise.num_timesteps,  # sigma in [0, 1], as FluxPipeline passes it
            guidance=guidance,
            pooled_projections=cond["pooled"].to(dtype),
            encoder_hidden_states=prompt,
            txt_ids=torch.zeros(prompt.shape[1], 3, device=self.device, dtype=dtype),
            img_ids=image_ids(h, w, self.device, dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)  # (B, 16, h, w)

    @torch.no_grad()
    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        """dev's ``guidance_scale`` is its guidance embedding; there is no negative prompt."""
        kwargs.pop("negative_prompt", None)
        return sample_packed(self, pipe, prompt, autocast, **kwargs)

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        import diffusers
        from transformers import CLIPTextModel, T5EncoderModel

        from models import tiny

        torch.manual_seed(seed)
        schnell = name == "flux-schnell"
        vae = tiny.vae16(shift_factor=0.1159, scaling_factor=0.3611)  # Flux's shift and scale
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels x a 2x2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5's width
            pooled_projection_dim=32,  # CLIP's
            guidance_embeds=not schnell,
            axes_dims_rope=(4, 4, 8),  # sums to the head dim
        )
        if schnell:
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        else:
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
        return cls.pipeline_class(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=CLIPTextModel(tiny.clip_text_config()),
            tokenizer=tiny.clip_tokenizer(),
            text_encoder_2=T5EncoderModel(tiny.t5_config(32)),
            tokenizer_2=tiny.t5_tokenizer(model_max_length=512),
        )


# FLUX.1 [dev]'s scheduler config (Chroma1-HD's too): sigmas shifted by the image's sequence length
DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


@torch.no_grad()
def sample_packed(module, pipe, prompt: str, autocast=None, **kwargs):
    """One validation image from a pipeline that returns packed latents for ``output_type="latent"`` (Flux,
    Chroma): the loop under ``autocast``, then unpack and decode outside it."""
    with autocast or torch.autocast(module.device.type, enabled=False):
        # the prompt by name: FluxKontextPipeline takes its input image first
        tokens = pipe(prompt=prompt, output_type="latent", max_sequence_length=module.options.t5_max_length, **kwargs).images
    factor = pipe.vae_scale_factor * 2
    latents = unpack(tokens, 2 * (kwargs["height"] // factor), 2 * (kwargs["width"] // factor))
    with torch.autocast(module.device.type, enabled=False):
        return module.decode_latents(pipe, latents)


def is_schnell(model_cfg) -> bool:
    """Whether ``model_cfg``'s checkpoint is schnell: its transformer has no guidance embedding (the
    config.json only; the name as a fallback when it cannot be read)."""
    from diffusers import FluxTransformer2DModel

    path = str(model_cfg.get("pretrained_model_name_or_path"))
    try:
        config = FluxTransformer2DModel.load_config(path, subfolder="transformer", revision=model_cfg.get("revision"))
    except (OSError, ValueError):
        return "schnell" in path.lower()
    return not config.get("guidance_embeds", True)
