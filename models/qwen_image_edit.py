"""Qwen-Image-Edit (Qwen/Qwen-Image-Edit: ``QwenImageEditPipeline``; Qwen/Qwen-Image-Edit-2509 and -2511:
``QwenImageEditPlusPipeline``, up to 3 input images): Qwen-Image (models/qwen_image.py: the 20 B MMDiT, its
Wan-style VAE normalised per channel, sigma in [0, 1], the dynamic shift, real CFG) that edits its input
images (the *references*) by an instruction. One family; the checkpoint's ``model_index.json`` tells the two
pipelines apart, as FLUX.2's does. What the edit pipelines add, and so what training adds:

- Each reference goes to Qwen2.5-VL as **vision input**: the edit prompt template places
  ``<|vision_start|><|image_pad|><|vision_end|>`` before the instruction (Plus: ``Picture n: ...`` for each
  image), the processor expands each image pad into the image's patch tokens, and the prompt is the last hidden
  states of the real tokens less the template's first 64, not cut to a length (the pipelines' own
  ``_get_qwen_prompt_embeds``, called here). So the prompt depends on the image: it is encoded in the step with
  the batch's reference pixels (``prompt_uses_references``), one sample at a time as the pipelines encode it
  (Plus takes one prompt a call), padded with a mask. A dropped caption is "" *with* the image: the pipelines'
  negative prompt.
- The image the VL model reads: Edit's is the image its VAE encodes; Plus resizes each input to about
  384 x 384 (``CONDITION_IMAGE_SIZE``) for it. Training gives it the same.
- Each reference's VAE latents (the posterior's mode, normalised per channel: ``_encode_vae_image``) are packed
  into tokens appended after the target's; ``img_shapes`` lists the target's token grid, then each reference's.
  The transformer's output over the reference tokens is dropped: the loss covers the target's tokens only.
  (2511's ``zero_cond_t`` transformer reads the references' timestep as 0 from ``img_shapes`` itself.)
- Sampling: both pipelines resize every input to about 1 MP for the VAE (``calculate_dimensions``), whatever
  the output's size, with no keyword or attribute to stop it. ``sampling_inputs(height, width, pipe)`` prepares
  ``pipe`` (as HiDream's sets its default area) to bring them to the asked area instead, the size training
  buckets a reference at: validation, the tests and the learning benchmark sample so. At the presets' 1024 px
  that is the pipelines' own 1 MP.
- Processor: the pipelines' ``Qwen2VLProcessor`` needs torchvision in transformers 5 (its video half), even for
  images alone. Training loads the checkpoint's ``processor/`` folder through ``Qwen2VLImageTextProcessor``,
  the same class less its video processor (its image processor: the torchvision one where installed, else the
  PIL one), so it trains without torchvision; users sampling with the stock pipeline need torchvision.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from models.base import NoOptions, lazy_class, resolve
from models.flux import pack, unpack
from models.flux_kontext import input_image  # a fixed input to edit when none is given (a blue square)
from models.qwen_image import QwenImageModule, tiny_text_encoder

PLUS_PIPELINE = "diffusers.QwenImageEditPlusPipeline"
PIPELINE_AREA = 1024 * 1024  # the pipelines' VAE area for an input (Plus: VAE_IMAGE_SIZE; Edit: a literal)
CONDITION_AREA = 384 * 384  # Plus's CONDITION_IMAGE_SIZE: what Qwen2.5-VL sees of each input


class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor, which needs torchvision: the same tokens, image
    placeholders and pixel values for text and images. Loads a checkpoint's ``processor/`` folder as it is."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels at aspect ``ratio``, each a multiple of 32: the pipelines'."""
    width = math.sqrt(area * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


@contextlib.contextmanager
def input_area(pipe, area: int) -> Iterator[None]:
    """While sampling with ``pipe``: its inputs brought to ``area`` pixels for the VAE instead of the pipeline's
    1 MP (its module's ``calculate_dimensions``, asked for that area, answers for ``area``; Plus's 384 x 384 for
    the VL model stays)."""
    from unittest import mock

    module = sys.modules[type(pipe).__module__]
    original = module.calculate_dimensions

    def scoped(target_area, ratio):
        return original(area if target_area == PIPELINE_AREA else target_area, ratio)

    with mock.patch.object(module, "calculate_dimensions", scoped):
        yield


def sample_inputs_at_area(pipe, area: int) -> None:
    """Make ``pipe`` bring its inputs to ``area`` pixels for the VAE on every call (``input_area``). The
    pipelines read their 1 MP in module code and build ``img_shapes`` from it, so no attribute of an instance
    can change it: the pipeline class's ``__call__`` is wrapped once to scope the area for instances that set
    ``input_area`` (this one now); any other instance samples as before, and ``pipe`` keeps its own class."""
    pipeline = type(pipe)
    if not getattr(pipeline.__call__, "scopes_input_area", False):
        original = pipeline.__call__

        @functools.wraps(original)
        def __call__(self, *args, **kwargs):
            scoped = vars(self).get("input_area")
            with input_area(self, scoped) if scoped else contextlib.nullcontext():
                return original(self, *args, **kwargs)

        __call__.scopes_input_area = True
        pipeline.__call__ = __call__
    pipe.input_area = area


class QwenImageEditModule(QwenImageModule):
    # Edit's pipeline here; a Plus checkpoint (2509, 2511) swaps in its own at load (``load_components``)
    pipeline_class = lazy_class("diffusers.QwenImageEditPipeline")
    conditioning_kinds: ClassVar[tuple[str, ...]] = ("reference",)
    max_references: ClassVar[int] = 3  # Plus's; Edit takes one, checked on the first batch (``_check_references``)
    reference_pixels_in_batch: ClassVar[bool] = True  # Qwen2.5-VL reads the input image
    prompt_uses_references: ClassVar[bool] = True
    tiny_variants = ("qwen-image-edit", "qwen-image-edit-plus")
    Options = NoOptions  # the edit pipelines do not cut the prompt: no max_sequence_length

    @classmethod
    def max_references_for(cls, model_cfg) -> int:
        """Edit's pipeline takes one input image, Plus's three: read from the checkpoint's model_index.json before
        anything loads (a checkpoint that cannot be read now is checked on the first batch instead)."""
        from diffusers import DiffusionPipeline

        try:
            index = DiffusionPipeline.load_config(model_cfg.pretrained_model_name_or_path, revision=model_cfg.get("revision"))
        except (OSError, ValueError):
            return cls.max_references
        return cls.max_references if index.get("_class_name") == PLUS_PIPELINE.rpartition(".")[2] else 1

    @classmethod
    def card_notes(cls, model_cfg) -> list[str]:
        return [
            "Qwen-Image-Edit edits input images: sample with the pipeline this checkpoint names (`QwenImageEditPipeline`"
            " for Qwen-Image-Edit; `QwenImageEditPlusPipeline`, up to 3 images as a list, for -2509 and -2511), the "
            "image to edit as `image=` and the instruction as `prompt=`, `true_cfg_scale=4.0` with "
            "`negative_prompt=\" \"`. The pipelines resize each input to about 1 megapixel; the inputs were trained at "
            "the training resolution. The stock pipeline's processor needs torchvision.",
        ]

    # ---- loading --------------------------------------------------------------------------------------------
    def load_components(self, path: str, common: dict) -> dict[str, Any]:
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(path, revision=common.get("revision"))
        self.plus = index.get("_class_name") == PLUS_PIPELINE.rpartition(".")[2]
        if self.plus:
            self.pipeline_class = resolve(PLUS_PIPELINE)
        processor = Qwen2VLImageTextProcessor.from_pretrained(path, subfolder="processor", revision=common.get("revision"))
        return {**super().load_components(path, common), "processor": processor}

    def pipeline_components(self) -> dict[str, Any]:
        return {**super().pipeline_components(), "processor": self.processor}

    # ---- conditioning ---------------------------------------------------------------------------------------
    def vl_images(self, pixels: Sequence[torch.Tensor]) -> list:
        """One sample's references ((3, H, W) in [-1, 1] each) -> the PIL images the pipeline hands Qwen2.5-VL:
        Edit's is the image its VAE encodes (at the area it samples at: ``input_area``), Plus's each brought to
        about 384 x 384."""
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor(vae_scale_factor=16)  # the pipelines' image_processor
        images = []
        for p in pixels:
            image = processor.postprocess(p[None].float().cpu(), output_type="pil")[0]
            area = CONDITION_AREA if self.plus else image.width * image.height
            width, height = calculate_dimensions(area, image.width / image.height)
            images.append(processor.resize(image, height, width))
        return images

    def encode_prompts(self, captions: Sequence[str], references: Sequence[torch.Tensor] | None = None) -> dict:
        """The prompts read with their input images (``references``: one (B, 3, H, W) in [-1, 1] per slot; the
        shared step passes the batch's, as ``prompt_uses_references`` asks), each sample alone as the pipelines
        encode it, zero-padded to the batch's longest: ``prompt_embeds`` (B, L, D) and ``prompt_mask`` (B, L)."""
        if references is None:
            raise ValueError("Qwen-Image-Edit reads each prompt with its input image: pass the references")
        self._check_references(len(references))
        pipe = self.pipeline_class(
            scheduler=None, vae=None, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            processor=self.processor, transformer=None,
        )
        rows = []
        for i, caption in enumerate(captions):
            images = self.vl_images([r[i] for r in references])
            embeds, _ = pipe._get_qwen_prompt_embeds([caption], images if self.plus else images[0], self.device)
            rows.append(embeds[0])  # (L_i, D)
        longest = max(len(r) for r in rows)
        out = rows[0].new_zeros(len(rows), longest, rows[0].shape[-1])
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=out.device)
        for i, row in enumerate(rows):
            out[i, : len(row)], mask[i, : len(row)] = row, 1
        return {"prompt_embeds": out, "prompt_mask": mask}

    def _check_references(self, count: int) -> None:
        if count > 1 and not self.plus:
            raise ValueError(
                f"data.conditioning.reference: Qwen-Image-Edit (QwenImageEditPipeline) takes one input image, the data "
                f"gives {count}; Qwen-Image-Edit-2509 and -2511 (QwenImageEditPlusPipeline) take up to 3"
            )

    def reference_inputs(self, encoded: torch.Tensor) -> torch.Tensor:
        """The posterior's mode, normalised per channel: ``_encode_vae_image`` (``sample_mode="argmax"``)."""
        mode = encoded.to(self.device).float().chunk(2, dim=1)[0]  # (B, 16, h, w)
        mean, std = self._latent_stats(mode)
        return (mode - mean) / std

    # ---- the denoiser call ------------------------------------------------------------------------------------
    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        dtype, (b, _, h, w) = self.denoiser_dtype, noisy.shape
        references = self.reference_latents(batch)  # each (B, 16, h_r, w_r)
        mask = cond["prompt_mask"].to(self.device)  # (B, L)
        tokens = [pack(noisy.to(dtype))] + [pack(r.to(dtype)) for r in references]
        shapes = [(1, h // 2, w // 2)] + [(1, r.shape[-2] // 2, r.shape[-1] // 2) for r in references]
        out = self.transformer(
            hidden_states=torch.cat(tokens, dim=1),  # (B, target tokens + every reference's, 64)
            timestep=timesteps / self.noise.num_timesteps,  # sigma in [0, 1], as the pipelines pass it
            encoder_hidden_states=cond["prompt_embeds"].to(self.device, dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # the pipelines' None: no padding
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0]
        return unpack(out[:, : tokens[0].shape[1]], h, w)  # the target's tokens only: (B, 16, h, w)

    # ---- sampling -------------------------------------------------------------------------------------------
    @classmethod
    def sampling_inputs(cls, height: int, width: int, pipe=None) -> dict[str, Any]:
        """A fixed input image of the asked size to edit; ``pipe`` made to keep inputs at the asked area."""
        if pipe is not None:
            sample_inputs_at_area(pipe, height * width)
        return {**cls.sampling_kwargs, "image": input_image(height, width)}

    @torch.no_grad()
    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        """Qwen-Image's sampling (real CFG against the negative prompt, "" by default) with validation's input
        images (``image=``: one, or a list for Plus), each brought to the asked area for the VAE as training
        buckets a reference (``sampling_inputs``); without one, the fixed ``input_image``."""
        height, width = kwargs["height"], kwargs["width"]
        image = kwargs.pop("image", None) or input_image(height, width)
        images = [i.convert("RGB") for i in (image if isinstance(image, (list, tuple)) else [image])]
        self._check_references(len(images))
        scale = kwargs.pop("guidance_scale", 1.0)
        negative = kwargs.pop("negative_prompt", None)
        kwargs.update(true_cfg_scale=scale, negative_prompt=(negative or "") if scale > 1 else None)
        sample_inputs_at_area(pipe, height * width)
        with autocast or contextlib.nullcontext():
            image = images if self.plus else images[0]
            tokens = pipe(image=image, prompt=prompt, output_type="latent", **kwargs).images  # the target's tokens
        latents = pipe._unpack_latents(tokens, height, width, pipe.vae_scale_factor)  # (B, 16, 1, h, w)
        with torch.autocast(self.device.type, enabled=False):
            return self.decode_latents(pipe, latents)

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from models import tiny

        base = QwenImageModule.tiny_pipeline("qwen_image", seed)
        tokenizer = tiny.qwen_tokenizer()
        # the real processor's settings but at most 112 x 112 pixels (16 image tokens) for the tiny vision tower
        images = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
        pipeline = resolve(PLUS_PIPELINE) if name == "qwen-image-edit-plus" else cls.pipeline_class
        return pipeline(
            transformer=base.transformer,
            scheduler=base.scheduler,
            vae=base.vae,
            text_encoder=tiny_text_encoder(tokenizer),
            tokenizer=tokenizer,
            processor=Qwen2VLImageTextProcessor(image_processor=images, tokenizer=tokenizer),
        )
