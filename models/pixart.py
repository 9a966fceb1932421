"""PixArt-Σ: a DiT over 4-channel latents, DDPM with epsilon prediction, conditioned on T5 alone.

- The prompt is T5's hidden states over 300 tokens with their attention mask (padding is masked out of
  cross-attention), of the caption lowercased and stripped, as ``PixArtSigmaPipeline`` encodes it with
  ``clean_caption=False``; validation passes that too (the pipeline's default cleans captions when bs4
  and ftfy are installed, which training does not).
- The transformer learns the variance too: it outputs 8 channels, and the loss takes the prediction half.
- Resolution and aspect-ratio conditioning are off for Σ (``use_additional_conditions=False``), as in the
  pipeline.
- ``PixArtSigmaPipeline`` has no LoRA loader (and its transformer no diffusers adapter support), so a LoRA
  is also written as a peft adapter folder, which ``PeftModel.from_pretrained(pipe.transformer, ...)``
  loads; full fine-tuning, the preset's default as for SimpleTuner's PixArt users, writes ``pipeline/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from models.base import DiffusionModule, lazy_class
from models.encoders import t5_with_mask

WEIGHT_NAME = "pytorch_lora_weights{suffix}.safetensors"


@dataclasses.dataclass
class PixArtOptions:
    t5_max_length: int = 300  # T5 tokens per prompt, as PixArt-Σ was trained


class PixArtSigmaModule(DiffusionModule):
    pipeline_class = lazy_class("diffusers.PixArtSigmaPipeline")
    denoiser_name = "transformer"
    noise_schedule = "ddpm"
    pixel_multiple = 16  # the VAE's 8x, then 2x2 patches
    license = "openrail++"
    Options = PixArtOptions
    components = {
        "transformer": "diffusers.PixArtTransformer2DModel",
        "vae": "diffusers.AutoencoderKL",
        "text_encoder": "transformers.T5EncoderModel",
        "tokenizer": "transformers.T5TokenizerFast",
    }
    default_lora_targets = ("to_k", "to_q", "to_v", "to_out.0")  # self- and cross-attention alike
    fsdp_blocks = ("BasicTransformerBlock",)  # trainer=fsdp shards the DiT by its blocks
    # binning refuses sizes it has no table for; training captions are not cleaned either
    sampling_kwargs = {"use_resolution_binning": False, "clean_caption": False}
    prompt_preprocessing = "lower_strip"  # the pipeline's, without clean_caption
    # The LoRA also goes out as a peft adapter folder, which peft loads onto the pipeline's transformer.
    lora_load_snippet = (
        "from peft import PeftModel\n"
        "pipe.transformer = PeftModel.from_pretrained(pipe.transformer, {path!r}, subfolder='transformer_lora')"
        ".merge_and_unload()"
    )

    @classmethod
    def load_lora(cls, pipe, path) -> None:
        from peft import PeftModel

        pipe.transformer = PeftModel.from_pretrained(
            pipe.transformer, str(path), subfolder="transformer_lora"
        ).merge_and_unload()

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        hidden, mask = t5_with_mask(
            self.tokenizer, self.text_encoder, self.pipeline_prompts(captions), self.options.t5_max_length, self.device
        )
        return {"prompt_embeds": hidden, "attention_mask": mask.float()}

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        dtype = self.denoiser_dtype
        out = self.transformer(
            noisy.to(dtype),  # (B, 4, h, w)
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_attention_mask=cond["attention_mask"].to(dtype),
            timestep=timesteps,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]  # (B, 8, h, w): the noise prediction and the learned variance
        if self.transformer.config.out_channels // 2 == noisy.shape[1]:
            out = out.chunk(2, dim=1)[0]
        return out

    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        kwargs["negative_prompt"] = kwargs.get("negative_prompt") or ""  # the pipeline wants a string
        return super().sample_image(pipe, prompt, autocast, max_sequence_length=self.options.t5_max_length, **kwargs)

    def save_weights(self, directory: str | Path, full_pipeline: bool = True, suffix: str = "") -> Path:
        """LoRA: ``pytorch_lora_weights<suffix>.safetensors`` (peft keys under ``transformer.``, with the
        adapter's settings as metadata, like every family's) and ``transformer_lora<suffix>/``, the same
        adapter as peft saves one, for ``PeftModel.from_pretrained``."""
        if self.hparams.finetune != "lora":
            return super().save_weights(directory, full_pipeline, suffix)
        import json

        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        from models.export import respect_umask

        directory = Path(directory)
        paths = []
        for adapter, tag in self.lora_adapters():  # one per split-schedule expert in a two-expert run
            folder = directory / f"transformer_lora{tag}{suffix}"
            folder.mkdir(parents=True, exist_ok=True)
            config = self.transformer.peft_config[adapter]
            state = get_peft_model_state_dict(self.transformer, adapter_name=adapter)
            state = {k: v.detach().contiguous() for k, v in state.items()}
            config.save_pretrained(str(folder))
            # peft's own layout: keys under the PeftModel wrapper's path, or PeftModel.from_pretrained loads nothing
            peft_keys = {f"base_model.model.{k}": v for k, v in state.items()}
            save_file(peft_keys, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
            path = directory / WEIGHT_NAME.format(suffix=f"{tag}{suffix}")
            settings = json.dumps(config.to_dict(), default=list, sort_keys=True)
            save_file(
                {f"transformer.{k}": v for k, v in state.items()},
                str(path),
                metadata={"format": "pt", "lora_adapter_metadata": settings},
            )
            respect_umask(folder)
            paths.append(respect_umask(path))
        return paths[0]

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        import diffusers
        from transformers import T5EncoderModel

        from models import tiny

        torch.manual_seed(seed)
        transformer = diffusers.PixArtTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,  # learned variance
            cross_attention_dim=16,
            caption_channels=32,  # T5's width
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            use_additional_conditions=False,
        )
        scheduler = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02
        )
        return cls.pipeline_class(
            transformer=transformer,
            scheduler=scheduler,
            vae=diffusers.AutoencoderKL(**tiny.VAE),
            text_encoder=T5EncoderModel(tiny.t5_config(32)),
            tokenizer=tiny.t5_tokenizer(model_max_length=300),
        )
