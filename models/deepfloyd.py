"""DeepFloyd IF, stage I (text -> 64 px) and stage II (64 -> 256 px): pixel-space UNets, DDPM, T5.

- **Pixel space.** There is no VAE: the UNet denoises the image itself (``latent_space = False``), so the
  data path caches text embeddings only and validation images need no decode.
- **Learned variance.** The UNet outputs the noise prediction and a variance (6 channels); the loss takes
  the prediction half, as the pipelines' schedulers read the other half only when sampling. Since the
  variance is never trained, validation and the export sample with ``variance_type="fixed_small"``
  (models/noise.py), and the model card says so (``card_notes``).
- **Prompts.** T5-XXL over 77 tokens with the tokenizer's attention mask, of the caption lowercased and
  stripped, as ``IFPipeline.encode_prompt`` (its ``_text_preprocessing``) encodes it.
- **Stage II** is trained on the target's own low-res version: downsampled by ``upscale_factor``, upsampled
  back, noised with the checkpoint's ``image_noising_scheduler`` at a random level, and concatenated on
  channels; that level goes in as ``class_labels``, as ``IFSuperResolutionPipeline`` does at sampling.
  Validation upscales the first held-out image, or stage I's own output when ``model.options.stage_1``
  names a stage I model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from models import objectives as obj
from models.base import DiffusionModule, lazy_class
from models.encoders import t5_with_mask

T5_MAX_LENGTH = 77  # IF's T5 was trained on 77 tokens


@dataclasses.dataclass
class IFOptions:
    t5_max_length: int = T5_MAX_LENGTH


@dataclasses.dataclass
class IFSuperResolutionOptions:
    t5_max_length: int = T5_MAX_LENGTH
    upscale_factor: int = 4  # 64 -> 256
    low_res_noise_max: int = 1000  # training noises the low-res input at a level drawn from [0, this)
    low_res_noise_level: int = 250  # validation's level, the pipeline's default noise_level
    stage_1: str | None = None  # a stage I model whose output validation upscales (default: a held-out image)


def to_pil(images: torch.Tensor):
    """A pipeline's ``output_type="pt"`` images, in [-1, 1] -> the first as a PIL image."""
    from PIL import Image

    array = ((images[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


class DeepFloydIFModule(DiffusionModule):
    pipeline_class = lazy_class("diffusers.IFPipeline")
    denoiser_name = "unet"
    noise_schedule = "ddpm"
    latent_space = False
    pixel_multiple = 8  # the UNet's three downsamplings
    license = "deepfloyd-if-license"
    license_note = (
        "DeepFloyd IF's weights are gated: accept the DeepFloyd IF licence on the base model's Hub page, and "
        "log in (`huggingface-cli login`), before they download. Its terms apply to this model too."
    )
    Options = IFOptions
    requires = {"sentencepiece": "deepfloyd"}  # IF's T5 tokenizer ships as a SentencePiece model
    components = {
        "unet": "diffusers.UNet2DConditionModel",
        "text_encoder": "transformers.T5EncoderModel",
        "tokenizer": "transformers.T5TokenizerFast",
    }
    # IF's attention projects the text through added key/value layers beside the image's own
    default_lora_targets = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
    fsdp_blocks = ("ResnetBlock2D", "Attention")  # trainer=fsdp shards IF's UNet by these (no Transformer2DModel)
    sampling_kwargs = {"clean_caption": False}  # training captions are not cleaned either (needs bs4, ftfy)
    prompt_preprocessing = "lower_strip"  # what both stages' pipelines do to a prompt without clean_caption

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        prompts = self.pipeline_prompts(captions)
        hidden, _ = t5_with_mask(self.tokenizer, self.text_encoder, prompts, self.options.t5_max_length, self.device)
        return {"encoder_hidden_states": hidden}

    @classmethod
    def card_notes(cls, model_cfg: Any) -> list[str]:
        where = (
            "The exported pipeline's scheduler is set so."
            if model_cfg.finetune == "full"
            else "The snippet below sets it on the base model's pipeline."
        )
        return [
            "IF's UNet predicts a variance beside the noise, which its scheduler uses when it samples "
            '(`variance_type="learned_range"`). This fine-tune trained the noise prediction only, so sample it '
            'with the fixed variance: `DDPMScheduler` with `variance_type="fixed_small"`, as validation did and as '
            f"diffusers' own IF fine-tuning samples. {where}"
        ]

    def unet_input(self, noisy: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's input and class labels: the noisy image alone for stage I."""
        return noisy, None

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        dtype = self.denoiser_dtype
        sample, class_labels = self.unet_input(noisy, cond)
        out = self.unet(
            sample.to(dtype),
            timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            class_labels=class_labels,
            return_dict=False,
        )[0]  # (B, 6, H, W): the noise prediction, then the learned variance
        return out[:, : noisy.shape[1]]

    def pipeline_components(self) -> dict[str, Any]:
        return {
            **super().pipeline_components(),
            "safety_checker": None,
            "feature_extractor": None,
            "watermarker": None,
            "requires_safety_checker": False,
        }

    @torch.no_grad()
    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        from contextlib import nullcontext

        with autocast or nullcontext():
            images = pipe(prompt, output_type="pt", **{**self.sampling_kwargs, **kwargs}).images
        return to_pil(images)

    @classmethod
    def tiny_unet(cls, **overrides):
        """A tiny IF UNet: IF's block types (resnet up/downsampling, attention with added text key/values,
        text-pooled time embedding), attention only at the lowest of three levels (pixel-space attention
        at full size is what makes a step slow)."""
        from diffusers import UNet2DConditionModel

        config = dict(
            sample_size=64,
            in_channels=3,
            out_channels=6,
            layers_per_block=1,
            block_out_channels=(16, 32, 32),
            down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
            cross_attention_dim=32,
            encoder_hid_dim=32,  # T5's width
            attention_head_dim=8,
            addition_embed_type="text",
            addition_embed_type_num_heads=2,
            cross_attention_norm="group_norm",
            resnet_time_scale_shift="scale_shift",
            act_fn="gelu",
            norm_num_groups=8,
        )
        return UNet2DConditionModel(**{**config, **overrides})

    @staticmethod
    def tiny_scheduler(**overrides):
        from diffusers import DDPMScheduler

        config = dict(
            num_train_timesteps=1000,
            beta_schedule="squaredcos_cap_v2",
            thresholding=True,
            dynamic_thresholding_ratio=0.95,
            sample_max_value=1.5,
            prediction_type="epsilon",
            variance_type="learned_range",
        )
        return DDPMScheduler(**{**config, **overrides})

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        torch.manual_seed(seed)
        return cls.pipeline_class(unet=cls.tiny_unet(), scheduler=cls.tiny_scheduler(), **cls.tiny_text_and_extras())

    @staticmethod
    def tiny_text_and_extras() -> dict[str, Any]:
        """Both stages' tiny T5 and tokenizer, and the safety checker, feature extractor and watermarker left out."""
        from transformers import T5EncoderModel

        from models import tiny

        return {
            "text_encoder": T5EncoderModel(tiny.t5_config(32)),
            "tokenizer": tiny.t5_tokenizer(model_max_length=T5_MAX_LENGTH),
            "safety_checker": None,
            "feature_extractor": None,
            "watermarker": None,
            "requires_safety_checker": False,
        }


class DeepFloydIFSuperResolutionModule(DeepFloydIFModule):
    pipeline_class = lazy_class("diffusers.IFSuperResolutionPipeline")
    pixel_multiple = 16  # edges divide by the upscale factor and by the UNet's downsamplings
    Options = IFSuperResolutionOptions

    def load_components(self, path: str, common: dict) -> dict[str, Any]:
        from diffusers import DDPMScheduler

        out = super().load_components(path, common)
        # the schedule that noises the low-res input (its level is the UNet's class label)
        out["image_noising_scheduler"] = DDPMScheduler.from_pretrained(
            path, subfolder="image_noising_scheduler", **common
        )
        return out

    def pipeline_components(self) -> dict[str, Any]:
        return {**super().pipeline_components(), "image_noising_scheduler": self.image_noising_scheduler}

    def image_conditioning(self, clean: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The target's low-res version, upsampled back and noised at a random level, and that level."""
        f = self.options.upscale_factor
        h, w = clean.shape[-2:]
        low = F.interpolate(clean, (h // f, w // f), mode="bilinear", antialias=True, align_corners=False)
        up = F.interpolate(low, (h, w), mode="bilinear", align_corners=True)  # as the pipeline upsamples
        levels = torch.randint(0, self.options.low_res_noise_max, (clean.shape[0],), generator=generator)
        levels = levels.to(clean.device)
        noised = self.image_noising_scheduler.add_noise(up, obj.randn(up.shape, generator, up), levels)
        return {"low_res": noised, "noise_level": levels}

    def unet_input(self, noisy: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.cat([noisy, cond["low_res"].to(noisy)], dim=1), cond["noise_level"]

    @torch.no_grad()
    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        f = self.options.upscale_factor
        size = (kwargs.get("height") or 256, kwargs.get("width") or 256)
        low = self.low_res_image(prompt, (size[0] // f, size[1] // f), kwargs)
        kwargs.update(image=low, noise_level=self.options.low_res_noise_level)
        return super().sample_image(pipe, prompt, autocast, **kwargs)

    def low_res_image(self, prompt: str, size: tuple[int, int], kwargs: dict) -> torch.Tensor:
        """What validation upscales, (1, 3, h, w) in [-1, 1]: stage I's image for the prompt when
        ``model.options.stage_1`` is set, else a held-out image downsampled: the n-th prompt gets the n-th
        image of the fixed validation batches (the held-out set, or the training set's first batches),
        cycling when there are more prompts than images, the same one at every validation."""
        if self.options.stage_1:
            stage_1 = self._stage_1_pipeline()
            seed = int(kwargs["generator"].initial_seed()) if kwargs.get("generator") is not None else 0
            return stage_1(
                prompt,
                height=size[0],
                width=size[1],
                num_inference_steps=kwargs.get("num_inference_steps") or 25,
                guidance_scale=kwargs.get("guidance_scale") or 7.0,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pt",
                **self.sampling_kwargs,
            ).images[:1]
        if getattr(self, "_held_out", None) is None:
            self._held_out = [image for batch in self.trainer.datamodule.fixed_batches(4) for image in batch["pixels"]]
            self._prompt_slots: dict[str, int] = {}
        slot = self._prompt_slots.setdefault(prompt, len(self._prompt_slots))
        pixels = self._held_out[slot % len(self._held_out)][None].to(self.device, torch.float32)
        return F.interpolate(pixels, size, mode="bilinear", antialias=True, align_corners=False)

    def _stage_1_pipeline(self):
        """Stage I, loaded once and sharing this run's T5 (both stages use the same encoder)."""
        if getattr(self, "_stage_1", None) is None:
            from diffusers import IFPipeline

            pipe = IFPipeline.from_pretrained(
                self.options.stage_1,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                safety_checker=None,
                feature_extractor=None,
                watermarker=None,
                requires_safety_checker=False,
                torch_dtype=self.denoiser_dtype,
            )
            pipe.set_progress_bar_config(disable=True)
            self._stage_1 = pipe
        return self._stage_1.to(self.device)

    @classmethod
    def sampling_inputs(cls, height: int, width: int, pipe=None) -> dict[str, Any]:
        """A smooth low-res image to upscale (pipelines of this family need one)."""
        f = IFSuperResolutionOptions.upscale_factor
        ramp = torch.linspace(-1, 1, width // f).expand(1, 3, height // f, width // f)
        return {**cls.sampling_kwargs, "image": ramp.clone()}

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        from diffusers import DDPMScheduler

        torch.manual_seed(seed)
        # the noised low-res image rides on channels; its noise level is a timestep-embedded class label
        unet = cls.tiny_unet(in_channels=6, class_embed_type="timestep")
        return cls.pipeline_class(
            unet=unet,
            scheduler=cls.tiny_scheduler(sample_max_value=1.0),
            image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
            **cls.tiny_text_and_extras(),
        )
