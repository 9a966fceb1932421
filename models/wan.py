"""Wan 2.1 (T2V 1.3B / 14B) and Wan 2.2 TI2V-5B: a flow-matching video DiT (``WanTransformer3DModel``) over the
Wan causal 3-D VAE's latents, conditioned on UMT5-XXL; trained exactly as ``WanPipeline`` samples.

- Prompts are cleaned as the pipeline cleans them (its own ``prompt_clean``: ftfy where installed, HTML
  unescaping, whitespace), tokenized to ``max_sequence_length`` (512, the pipeline's ``__call__`` default);
  UMT5 runs with the attention mask and each row keeps its real tokens' hidden states, zero-padded to 512.
  The transformer gets all 512 rows and no mask, as the pipeline hands them.
- Clips (B, 3, F, H, W), F = 4k + 1 (an image is a 1-frame clip), go through the VAE whole: Wan 2.1's is 16
  channels at 1/8 size and 1/4 time, Wan 2.2's 48 channels at 1/16 (its 2x2 pixel patch inside the VAE).
  Latents are normalised per channel by the VAE config's ``latents_mean`` / ``latents_std`` exactly as the
  pipeline undoes it before decoding. The transformer patchifies (1, 2, 2) itself: it gets (B, C, f, h, w).
- Flow matching on ``sigma * 1000`` (the UniPC scheduler's flow sigmas): the shift is the checkpoint
  scheduler's ``flow_shift`` (3.0 for 2.1, 5.0 for 2.2 TI2V-5B; UniPC names it so, not ``shift``), or
  ``model.flow_shift``. Wan 2.2 TI2V-5B's pipeline (``expand_timesteps``) hands the timestep per token,
  (B, f * h/2 * w/2), and so does ``denoise``.
- Wan 2.2 A14B (``transformer_2``, ``boundary_ratio``): ``model.experts=two_lora`` trains a LoRA on each transformer
  in one run (models/experts.py; split at the checkpoint's ``boundary_ratio``), validation hands the pipeline both;
  ``model.expert=high_noise`` trains ``transformer`` alone (levels above the boundary), ``low_noise`` ``transformer_2``
  (a full fine-tune writes it back there).
- Validation samples an ``options.validation_frames`` clip (9; 1 gives an image) with the pipeline's own CFG
  (``guidance_scale``, negative prompt "" by default) and returns its frames.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import ClassVar

import torch

from models.base import DiffusionModule, lazy_class
from models.trainable import model_index

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers' scheduler/scheduler_config.json (14B's is the same; Wan2.2-TI2V-5B's has
# flow_shift 5.0)
WAN_SCHEDULER = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                     solver_order=2, solver_type="bh2", final_sigmas_type="zero")

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # self-attention (attn1) and cross-attention (attn2)
_FFN = ("ffn.net.0.proj", "ffn.net.2")
EXPERT_DENOISERS = {"high_noise": "transformer", "low_noise": "transformer_2"}  # Wan 2.2 A14B's


@dataclasses.dataclass
class WanOptions:
    max_sequence_length: int = 512  # UMT5 tokens, WanPipeline's default
    validation_frames: int = 9  # frames of a validation clip (4k + 1; 1: an image)


def prompt_embeds(tokenizer, encoder, prompts: Sequence[str], max_length: int, device) -> torch.Tensor:
    """WanPipeline's ``_get_t5_prompt_embeds``: UMT5's last hidden states of the real tokens, zero-padded to
    ``max_length`` (B, max_length, D). ``prompts`` are already cleaned."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device)
    hidden = encoder(tokens.input_ids.to(device), mask).last_hidden_state
    return hidden * mask[..., None].to(hidden.dtype)  # the pipeline's cut to the real tokens, padded back with zeros


class WanModule(DiffusionModule):
    pipeline_class = lazy_class("diffusers.WanPipeline")
    denoiser_name = "transformer"
    noise_schedule = "flow"
    pixel_multiple = 16  # Wan 2.1: the VAE's 8x, then the transformer's 2x2 patch (Wan 2.2 TI2V-5B needs 32)
    video: ClassVar[bool] = True
    frame_multiple: ClassVar[int] = 4  # 4k + 1 frames: the VAE's temporal 4x after the first frame
    license = "apache-2.0"
    Options = WanOptions
    components = {
        "transformer": "diffusers.WanTransformer3DModel",
        "vae": "diffusers.AutoencoderKLWan",
        "text_encoder": "transformers.UMT5EncoderModel",
        "tokenizer": "transformers.AutoTokenizer",
    }
    # Attention projections (self and cross), SimpleTuner's and ai-toolkit's default; musubi-tuner's LoRA
    # covers every linear of the blocks (attention+ffn).
    default_lora_targets = _ATTENTION
    lora_target_presets = {"attention": _ATTENTION, "attention+ffn": _ATTENTION + _FFN, "all": _ATTENTION + _FFN}
    fsdp_blocks = ("WanTransformerBlock",)
    tiny_variants = ("wan21", "wan22-ti2v", "wan22-a14b")
    expert_subfolders = EXPERT_DENOISERS  # Wan 2.2 A14B: each expert its own transformer (models/adapters.py)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.hparams.flow_shift is None:  # UniPC's key; the shared schedule reads ``shift``
            self.noise.shift = float(self.noise.config.get("flow_shift", self.noise.config.get("shift", 1.0)))

    @classmethod
    def check_config(cls, model_cfg) -> None:
        """Wan 2.2 A14B (a ``boundary_ratio`` in model_index.json) trains an expert or both; their split is the
        checkpoint's, written into ``model.expert_boundary``."""
        index = model_index(model_cfg.pretrained_model_name_or_path, model_cfg.get("revision"))
        if index is None or index.get("boundary_ratio") is None:  # (the demo's tiny checkpoint is written later)
            return
        if not model_cfg.get("experts") and not model_cfg.get("expert"):
            raise ValueError(
                "Wan 2.2 A14B has two transformers: train both with model.experts=two_lora (a LoRA on each), or one "
                "with model.expert=high_noise (transformer) or model.expert=low_noise (transformer_2)"
            )
        if model_cfg.get("experts") and model_cfg.get("finetune") != "lora":
            raise ValueError("model.experts=two_lora trains a LoRA on each Wan 2.2 A14B transformer: set model.finetune=lora")
        model_cfg.expert_boundary = float(index["boundary_ratio"])

    @classmethod
    def card_notes(cls, model_cfg) -> list[str]:
        notes = [f"Wan samples with the pipeline's CFG (`guidance_scale`, 5.0 is usual) and `max_sequence_length="
                 f"{(model_cfg.get('options') or {}).get('max_sequence_length', 512)}`; `num_frames` must be 4k + 1."]
        if model_cfg.get("expert") == "low_noise":
            notes.append("This LoRA is Wan 2.2 A14B's low-noise expert (`transformer_2`): load it with "
                         "`pipe.load_lora_weights(path, load_into_transformer_2=True)`.")
        return notes + ([f"Two LoRAs, one per Wan 2.2 A14B expert: `_high_noise` for `transformer`, `_low_noise` for "
                         "`transformer_2` (`load_into_transformer_2=True`); WanPipeline switches at the checkpoint's "
                         f"`boundary_ratio` ({model_cfg.expert_boundary})."] if cls.checkpoint_experts(model_cfg) else [])

    @classmethod
    def pixel_multiple_for(cls, model_cfg) -> int:
        """The VAE's spatial factor times the 2x2 patch: 16 for Wan 2.1 and A14B, 32 for TI2V-5B's 16x VAE (read from
        a local checkpoint's VAE config; for a Hub id, from model_index.json, where TI2V alone sets expand_timesteps)."""
        path = model_cfg.pretrained_model_name_or_path
        vae = Path(path) / "vae" / "config.json"
        if vae.is_file():
            return int(json.loads(vae.read_text()).get("scale_factor_spatial", 8)) * 2
        index = model_index(path, model_cfg.get("revision"))
        return 32 if index and index.get("expand_timesteps") else cls.pixel_multiple

    def load_components(self, path: str, common: dict) -> dict:
        """Each component from its subfolder. Wan 2.2 A14B: the expert's own transformer as the denoiser, or both with
        ``model.experts=two_lora``; its ``boundary_ratio`` is the experts' split."""
        from diffusers import DiffusionPipeline

        from models import trainable
        from models.quantize import load_time_config

        hp = self.hparams
        index = DiffusionPipeline.load_config(path, revision=hp.revision)
        self.expand_timesteps = bool(index.get("expand_timesteps") or False)  # Wan 2.2 TI2V-5B
        self.boundary_ratio = index.get("boundary_ratio")  # Wan 2.2 A14B
        two = (index.get("transformer_2") or [None])[0] is not None
        if self.boundary_ratio is not None and (hp.expert or hp.experts):
            hp.expert_boundary = float(self.boundary_ratio)  # before the schedule and the experts are built
        plan, out = self.dtype_plan(), {}
        qconfig = load_time_config(hp.base_model_precision, trainable.DTYPES[hp.mixed_precision])
        for name, cls in self.component_classes().items():
            sub = name
            if name == self.denoiser_name and two and hp.expert in EXPERT_DENOISERS:
                sub = EXPERT_DENOISERS[hp.expert]
            kwargs = trainable.load_kwargs(cls, plan.get(name), common, qconfig if name == self.denoiser_name else None)
            out[name] = cls.from_pretrained(path, subfolder=sub, **kwargs)
            if name == self.denoiser_name and two and hp.experts == "two_lora":
                out["transformer_2"] = cls.from_pretrained(path, subfolder="transformer_2", **kwargs)
        return out

    def denoiser_slot(self) -> str:
        """An A14B expert's run writes its transformer back into the expert's own slot (``transformer_2``: low noise)."""
        expert = self.hparams.expert
        return EXPERT_DENOISERS[expert] if self.boundary_ratio is not None and expert in EXPERT_DENOISERS else "transformer"

    def pipeline_components(self) -> dict:
        out = {**super().pipeline_components(), "expand_timesteps": self.expand_timesteps}
        if self.expert_denoisers():  # both experts: the pipeline switches at the boundary itself
            out.update(transformer_2=self.transformer_2, boundary_ratio=self.boundary_ratio)
        elif self.boundary_ratio is not None:  # one A14B expert samples alone: the other level range is its too
            out.update(boundary_ratio=None)
        return out

    # ---- latents: clips (B, 3, F, H, W), normalised per channel ----------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE config's per-channel ``latents_mean`` and ``latents_std``, shaped (1, C, 1, 1, 1) like ``like``."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images or (B, 3, F, H, W) clips in [-1, 1] -> the posterior's mean and log-variance
        (B, 2C, f, h, w), f = (F - 1) / 4 + 1 (1 for an image)."""
        clips = pixels if pixels.ndim == 5 else pixels[:, :, None]
        return self.vae.encode(clips.to(self.vae.device, self.vae_dtype)).latent_dist.parameters

    def model_inputs(self, encoded: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample normalised as WanPipeline un-normalises before decoding: (z - mean) / std per
        channel. (B, C, f, h, w)"""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents = DiagonalGaussianDistribution(encoded.to(self.device)).sample(generator=generator)
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    def decode_latents(self, pipe, latents: torch.Tensor):
        """Normalised latents (B, C, f, h, w) -> the first clip's frames as PIL images (one frame: the image)."""
        latents = latents.to(self.vae.device, self.vae_dtype)
        mean, std = self._latent_stats(latents)
        video = self.vae.decode(latents * std + mean).sample  # (B, 3, F, H, W), as the pipeline decodes
        frames = pipe.video_processor.postprocess_video(video.float(), output_type="pil")[0]
        return frames if len(frames) > 1 else frames[0]

    # ---- conditioning and the denoiser call -----------------------------------------------------------------
    def pipeline_prompts(self, captions: Sequence[str]) -> list[str]:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        return [prompt_clean(c) for c in captions]

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds = prompt_embeds(
            self.tokenizer, self.text_encoder, self.pipeline_prompts(captions), self.options.max_sequence_length, self.device
        )
        return {"prompt_embeds": embeds}  # (B, 512, D)

    def denoiser_timesteps(self, timesteps: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """What WanPipeline hands the transformer: t (B,), or with ``expand_timesteps`` (Wan 2.2 TI2V-5B) t per
        token (B, f * h/p * w/p)."""
        if not self.expand_timesteps:
            return timesteps
        _, ph, pw = self.denoiser.config.patch_size
        b, _, f, h, w = latents.shape
        return timesteps[:, None].expand(b, f * (h // ph) * (w // pw))

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        dtype, (_, ph, pw) = self.denoiser_dtype, self.denoiser.config.patch_size
        if noisy.shape[-2] % ph or noisy.shape[-1] % pw:
            edge = ph * self.vae.config.scale_factor_spatial
            raise ValueError(f"this checkpoint needs image edges divisible by {edge} (its VAE and 2x2 patch): set data.bucket_step={edge}")
        return self.denoiser(  # the step's expert's own transformer in a two-expert Wan 2.2 A14B run
            hidden_states=noisy.to(dtype),  # (B, C, f, h, w): the transformer patchifies (1, 2, 2) itself
            timestep=self.denoiser_timesteps(timesteps, noisy),  # sigma * 1000, as the UniPC ladder's
            encoder_hidden_states=cond["prompt_embeds"].to(self.device, dtype),
            return_dict=False,
        )[0]

    @classmethod
    def sampling_inputs(cls, height: int, width: int, pipe=None) -> dict:
        return {"num_frames": 5}  # a short clip: two latent frames

    @torch.no_grad()
    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        """The frames of an ``options.validation_frames``-frame clip (validation writes the .mp4 and a frame strip),
        sampled with the pipeline's CFG (``guidance_scale``, the negative prompt "" unless one is set)."""
        kwargs.setdefault("num_frames", self.options.validation_frames)
        with autocast or nullcontext():
            latents = pipe(prompt, output_type="latent", max_sequence_length=self.options.max_sequence_length, **kwargs).frames
        with torch.autocast(self.device.type, enabled=False):
            return self.decode_latents(pipe, latents)

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        import diffusers
        from transformers import UMT5Config, UMT5EncoderModel

        from models import tiny

        ti2v = name == "wan22-ti2v"
        torch.manual_seed(seed)
        channels = 48 if ti2v else 16

        def transformer():
            return diffusers.WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=2,
                attention_head_dim=16,  # RoPE: 8 (frames) + 4 (rows) + 4 (columns); a width of 24 crashed int8 on CPU
                in_channels=channels,
                out_channels=channels,
                text_dim=32,  # UMT5's width
                freq_dim=256,  # the real one's (32 could not tell high noise levels apart well enough)
                ffn_dim=128,
                num_layers=2,  # RoPE is relative only: one block to find where a token is, one to use it (bench/learn.py)
                rope_max_seq_len=32,
            )

        if ti2v:  # Wan 2.2's VAE: residual, a 2x2 pixel patch inside, 48 channels at 1/16
            vae = diffusers.AutoencoderKLWan(
                base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, is_residual=True,
                in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                latents_mean=torch.linspace(-0.5, 0.5, 48).tolist(), latents_std=torch.linspace(0.5, 2.0, 48).tolist(),
            )
        else:  # Wan 2.1's (the class defaults are its latents_mean / latents_std)
            vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
        encoder = UMT5EncoderModel(
            UMT5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                       relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
        )
        extra = {}
        if name == "wan22-a14b":  # two experts, switched at the checkpoint's boundary_ratio (T2V-A14B's)
            extra = dict(transformer_2=transformer(), boundary_ratio=0.875)
        scheduler = {**WAN_SCHEDULER, "flow_shift": 5.0} if ti2v else WAN_SCHEDULER
        return cls.pipeline_class(
            transformer=transformer(),
            vae=vae,
            text_encoder=encoder,
            tokenizer=tiny.t5_tokenizer(model_max_length=512),
            scheduler=diffusers.UniPCMultistepScheduler(**scheduler),
            expand_timesteps=ti2v,
            **extra,
        )

