"""FLUX.2 ([dev] and [klein]): a rectified-flow MMDiT over 2x2-patchified, batch-normalised latents,
conditioned on a decoder-only language model's stacked hidden states.

- One family, two pipelines, told apart by the checkpoint's ``model_index.json``: ``Flux2Pipeline`` (dev:
  Mistral Small 3.x behind a Pixtral processor, its system message, hidden layers 10/20/30, a guidance
  embedding) or ``Flux2KleinPipeline`` (klein: Qwen3 behind its chat template with thinking off, hidden layers
  9/18/27, no guidance embedding; ``is_distilled`` marks the 4-step checkpoints, which sample without CFG).
  The layers are the pipelines' own defaults, read from their signatures.
- The prompt is the whole padded sequence (512 tokens): the transformer takes no text mask, and the pipelines
  hand it every padding token's states, so training does too.
- Latents: the VAE's 32 channels are patchified 2x2 into 128 and normalised by the VAE's batch-norm running
  statistics, exactly as the pipelines un-normalise before decoding; the denoiser trains on those (B, 128,
  H/16, W/16), packed row by row into tokens with 4-D position ids (t, h, w, l); text ids are (0, 0, 0, l).
- The transformer sees sigma in [0, 1] (``timestep / 1000``). Sigmas are shifted as the pipelines shift them:
  ``exp(mu)`` with Flux.2's empirical ``mu`` of the image's token count *and the number of sampling steps*;
  training takes it at ``model.options.shift_steps`` (the pipelines' default 50). ``model.flow_shift`` sets a
  fixed shift instead.
- dev trains its guidance embedding at ``model.options.guidance`` (1.0, SimpleTuner's choice, as for FLUX.1
  [dev]); validation's ``guidance_scale`` goes into that embedding. klein base samples with real CFG against
  the empty prompt (the pipeline has no negative prompt); a distilled klein ignores ``guidance_scale``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from models import trainable
from models.base import DiffusionModule, lazy_class, resolve

log = logging.getLogger(__name__)

# Double-stream attention (image and text halves), then the single-stream blocks' fused QKV+MLP input.
_ATTENTION = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_qkv_mlp_proj",
)
# The single blocks' fused attention+MLP output is a Linear named ``to_out``, as the double blocks' ModuleList is:
# peft would match both by the plain name, so it is named per block (48: dev's count, the most of any variant).
_SINGLE_OUT = tuple(f"single_transformer_blocks.{i}.attn.to_out" for i in range(48))
_FFN = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
# the shared modulations (FLUX.2 has one per stream kind, not one per block as FLUX.1)
_MODULATION = (
    "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear", "single_stream_modulation.linear",
)
DEV_PIPELINE = "diffusers.Flux2Pipeline"
# the public transformers' joint_attention_dim (3 stacked hidden layers) -> which weights, their licence (the Hub's
# id for it, and its name)
WEIGHTS = {
    15360: ("FLUX.2 [dev]", "other", "the FLUX.2 [dev] Non-Commercial License (flux-dev-non-commercial-license)"),
    12288: ("FLUX.2 [klein] 9B", "other", "the FLUX Non-Commercial License"),
    7680: ("FLUX.2 [klein] 4B", "apache-2.0", "Apache-2.0"),
}


@dataclasses.dataclass
class Flux2Options:
    max_sequence_length: int = 512  # text tokens per prompt, the pipelines' default
    guidance: float = 1.0  # dev: the guidance embedding's value while training (SimpleTuner's 1.0); klein has none
    shift_steps: int = 50  # the sampling steps whose shift training uses (Flux.2's mu depends on them; 50: the default)


@dataclasses.dataclass(frozen=True)
class Variant:
    """What the checkpoint is, from its ``model_index.json``."""

    dev: bool  # Flux2Pipeline (Mistral, guidance embedding); else Flux2KleinPipeline (Qwen3)
    distilled: bool  # klein's step-distilled checkpoints: sampled in 4 steps without CFG
    text_classes: dict = dataclasses.field(default_factory=dict)  # text_encoder, tokenizer -> "library.Class"

    @classmethod
    def of(cls, path: str, revision: str | None = None) -> Variant:
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(path, revision=revision)
        text = {name: ".".join(index[name]) for name in ("text_encoder", "tokenizer") if name in index}
        return cls(index.get("_class_name") == "Flux2Pipeline", bool(index.get("is_distilled", False)), text)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channel c*4 + 2*dy + dx: the pipelines' ``_patchify_latents``."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of ``patchify``: (B, 4C, h, w) -> (B, C, 2h, 2w)."""
    b, c, h, w = latents.shape
    return latents.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def bn_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's batch-norm running mean and std (1, 4C, 1, 1), as the pipelines compute them."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


def position_ids(h: int, w: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions as the pipelines build them: image tokens (h*w, 4) rows of (0, row, column, 0), text
    tokens (length, 4) rows of (0, 0, 0, index)."""
    one = torch.arange(1)
    image = torch.cartesian_prod(one, torch.arange(h), torch.arange(w), one)
    text = torch.cartesian_prod(one, one, one, torch.arange(length))
    return image.to(device), text.to(device)


class Flux2Module(DiffusionModule):
    # klein's pipeline and encoders here; a dev checkpoint swaps in its own at load (``load_components``)
    pipeline_class = lazy_class("diffusers.Flux2KleinPipeline")
    denoiser_name = "transformer"
    denoiser_timestep_scale = 1.0  # the pipelines pass sigma itself
    noise_schedule = "flow"
    pixel_multiple = 16  # the VAE's 8x, then the 2x2 patch
    license = "other"  # dev and klein 9B: non-commercial; the flux2-klein preset (4B) sets apache-2.0
    Options = Flux2Options
    components = {
        "transformer": "diffusers.Flux2Transformer2DModel",
        "vae": "diffusers.AutoencoderKLFlux2",
        "text_encoder": "transformers.Qwen3ForCausalLM",
        "tokenizer": "transformers.Qwen2TokenizerFast",
    }
    default_lora_targets = _ATTENTION
    fsdp_blocks = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")
    lora_target_presets = {
        "attention": _ATTENTION,
        "attention+ffn": _ATTENTION + _SINGLE_OUT + _FFN,
        "all": _ATTENTION + _SINGLE_OUT + _FFN + _MODULATION,
    }
    tiny_variants = ("flux2-dev", "flux2-klein")

    def load_components(self, path: str, common: dict) -> dict:
        from models.quantize import load_time_config

        hp = self.hparams
        self.variant = Variant.of(path, hp.revision)
        # the text encoder and tokenizer (processor) as the checkpoint names them: Qwen3 and its tokenizer for
        # klein, Mistral 3 and its Pixtral processor for dev
        classes = {**self.component_classes(), **{k: resolve(v) for k, v in self.variant.text_classes.items()}}
        if self.variant.dev:
            self.pipeline_class = resolve(DEV_PIPELINE)
        plan, out = self.dtype_plan(), {}
        for name, cls in classes.items():
            qconfig = None
            if name == self.denoiser_name:
                qconfig = load_time_config(hp.base_model_precision, trainable.DTYPES[hp.mixed_precision])
            kwargs = trainable.load_kwargs(cls, plan.get(name), common, qconfig)
            out[name] = cls.from_pretrained(path, subfolder=name, **kwargs)
        return out

    def pipeline_components(self) -> dict:
        extra = {} if self.variant.dev else {"is_distilled": self.variant.distilled}  # klein's pipeline config
        return {**super().pipeline_components(), **extra}

    @classmethod
    def checkpoint_card(cls, model_cfg) -> dict[str, str]:
        """The model card's pipeline class and licence, from the checkpoint (tuner/runtime/lifecycle.py)."""
        variant, weights = checkpoint_of(model_cfg)
        card = {"pipeline": (DEV_PIPELINE if variant.dev else "diffusers.Flux2KleinPipeline").rpartition(".")[2]}
        return {**card, "license": weights[1]} if weights else card

    @classmethod
    def card_notes(cls, model_cfg) -> list[str]:
        options = model_cfg.get("options") or {}
        variant, weights = checkpoint_of(model_cfg)
        notes = [f"Trained on {weights[0]}, whose weights are under {weights[2]}."] if weights else []
        tokens = options.get("max_sequence_length", 512)
        if variant.dev:
            notes.append(
                f"FLUX.2 [dev] is guidance-distilled: it trained with its guidance embedding at "
                f"{options.get('guidance', 1.0)}; sample at the usual `guidance_scale` (2.5-4, the embedding's value), "
                f"without a negative prompt, `max_sequence_length={tokens}`."
            )
        elif variant.distilled:
            notes.append(
                "Warning: trained on a step-distilled FLUX.2 [klein], which these weights may un-distill (blurry "
                "samples at its 4 steps); the klein base checkpoints (FLUX.2-klein-base-4B/9B) are the ones to train."
            )
        else:
            notes.append(
                "FLUX.2 [klein] base samples with real classifier-free guidance against the empty prompt: "
                f"`guidance_scale` about 4, ~50 steps, `max_sequence_length={tokens}`."
            )
        return notes

    # ---- latents ------------------------------------------------------------------------------------------
    def model_inputs(self, encoded: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample, patchified and normalised by the VAE's batch-norm statistics, as the pipelines
        un-normalise before decoding. (B, 128, H/16, W/16)"""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents = patchify(DiagonalGaussianDistribution(encoded.to(self.device)).sample(generator=generator))
        mean, std = bn_stats(self.vae, latents)
        return (latents - mean) / std

    def decode_latents(self, pipe, latents: torch.Tensor):
        """The VAE's own latents (B, 32, H/8, W/8) -> a PIL image."""
        image = self.vae.decode(latents.to(self.vae.device, self.vae_dtype)).sample
        return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]

    # ---- conditioning and the denoiser call ---------------------------------------------------------------
    def text_layers(self) -> tuple[int, ...]:
        """The hidden layers the pipeline stacks: its own default (dev 10/20/30, klein 9/18/27)."""
        return tuple(inspect.signature(self.pipeline_class.encode_prompt).parameters["text_encoder_out_layers"].default)

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        # the pipelines' own prompt encoders (chat template, system message, stacked layers): (B, L, 3 * D)
        pipe = self.pipeline_class
        encode = pipe._get_mistral_3_small_prompt_embeds if self.variant.dev else pipe._get_qwen3_prompt_embeds
        embeds = encode(
            self.text_encoder, self.tokenizer, list(captions), device=self.device,
            max_sequence_length=self.options.max_sequence_length, hidden_states_layers=self.text_layers(),
        )
        return {"prompt_embeds": embeds}

    def flow_shift_for(self, latents: torch.Tensor) -> float | None:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        if self.hparams.flow_shift is not None or not self.noise.config.get("use_dynamic_shifting"):
            return None  # the override, or a fixed shift in the checkpoint's scheduler
        tokens = latents.shape[-2] * latents.shape[-1]  # latents are already patchified: one token each
        return math.exp(compute_empirical_mu(tokens, self.options.shift_steps))

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        dtype, (b, c, h, w) = self.denoiser_dtype, noisy.shape
        prompt = cond["prompt_embeds"].to(self.device, dtype)  # (B, L, 3 * D)
        image_ids, text_ids = position_ids(h, w, prompt.shape[1], self.device)
        guidance = None
        if self.transformer.config.guidance_embeds:  # dev
            guidance = torch.full((b,), self.options.guidance, device=self.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=noisy.to(dtype).flatten(2).transpose(1, 2),  # (B, h*w, 128), row by row
            timestep=timesteps / self.noise.num_timesteps,  # sigma in [0, 1], as the pipelines pass it
            guidance=guidance,
            encoder_hidden_states=prompt,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return out.transpose(1, 2).reshape(b, c, h, w)  # (B, 128, h, w)

    _said_negative = False

    @torch.no_grad()
    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        """Neither pipeline takes a negative prompt (klein's CFG runs against "", dev has none): it is
        dropped. dev's ``output_type="latent"`` is its normalised tokens, klein's the VAE's own latents."""
        if kwargs.pop("negative_prompt", None) and not self._said_negative:
            self._said_negative = True  # once a run, not at every validation
            log.warning("FLUX.2's pipelines take no negative prompt: callbacks.validation.negative_prompt is not used")
        with autocast or nullcontext():
            tokens = self.options.max_sequence_length
            latents = pipe(prompt=prompt, output_type="latent", max_sequence_length=tokens, **kwargs).images
        if latents.ndim == 3:  # dev: (B, h*w, 128) tokens, row by row
            h, w = kwargs["height"] // (pipe.vae_scale_factor * 2), kwargs["width"] // (pipe.vae_scale_factor * 2)
            latents = latents.transpose(1, 2).reshape(latents.shape[0], -1, h, w)
            mean, std = bn_stats(self.vae, latents)
            latents = unpatchify(latents * std + mean)
        with torch.autocast(self.device.type, enabled=False):
            return self.decode_latents(pipe, latents)

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        from models.tiny_flux2 import tiny_flux2

        return tiny_flux2(dev=name == "flux2-dev", seed=seed)


def checkpoint_of(model_cfg) -> tuple[Variant, tuple[str, str, str] | None]:
    """The checkpoint's variant and, when its transformer is one of the public ones (``WEIGHTS``, told by its
    text width), which weights and licence; from the path's name where the configs cannot be read."""
    from diffusers import Flux2Transformer2DModel

    path, revision = str(model_cfg.get("pretrained_model_name_or_path")), model_cfg.get("revision")
    try:
        variant = Variant.of(path, revision)
        config = Flux2Transformer2DModel.load_config(path, subfolder="transformer", revision=revision)
    except (OSError, ValueError):
        name = path.lower()
        dim = 15360 if "klein" not in name else 12288 if "9b" in name else 7680
        return Variant(dev="klein" not in name, distilled="base" not in name), WEIGHTS[dim]
    return variant, WEIGHTS.get(config.get("joint_attention_dim"))
