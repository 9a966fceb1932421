"""FLUX.1 Kontext [dev]: Flux.1 dev that edits an input image (the *reference*) by an instruction.

Everything of Flux.1 dev holds (models/flux.py: CLIP's pooled output and T5's hidden states, 16-channel latents
packed 2x2 into tokens, sigma in [0, 1], the guidance embedding at ``model.options.guidance`` while training,
sigmas shifted by the image's sequence length). What ``FluxKontextPipeline`` adds, and so what training adds:

- The reference's latents (the VAE posterior's mode, shifted and scaled: ``_encode_vae_image``) are packed into
  tokens of their own and appended **after** the target's; their image ids are the target's kind of (0, row,
  column) grid over the *reference's* size with the first column set to 1, which is all that tells the
  transformer which tokens are the input. The reference is never noised.
- The transformer's output over the reference tokens is dropped: the prediction, and so the loss, covers the
  target's tokens only (the pipeline steps the target's tokens alone).
- The dynamic shift counts the target's tokens only, as the pipeline's ``image_seq_len`` does.
- A reference may have another aspect ratio than its target (``references_own_bucket``): its tokens and ids
  follow its own latent size. The pipeline takes one input image (``max_references`` 1).
- Sampling: the pipeline would resize both the output (``max_area``, 1 MP) and the input (``_auto_resize``, to
  Kontext's preferred resolutions) to about 1024 x 1024; validation and the tests sample at the asked size
  instead, the input brought to the same area at its own aspect ratio, as training buckets it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from models.base import lazy_class
from models.flux import FluxModule, image_ids, pack, sample_packed, unpack


def reference_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Positions of a reference's packed tokens: the target's grid over its (h, w) latents, first column 1
    (``FluxKontextPipeline.prepare_latents``). (h/2 * w/2, 3)."""
    ids = image_ids(h, w, device, dtype)
    ids[:, 0] = 1
    return ids


def at_area(image, area: int, multiple: int = 16):
    """``image`` (PIL) resized to about ``area`` pixels at its own aspect ratio, each edge a multiple of
    ``multiple`` (the pipeline's ``vae_scale_factor * 2``): the size training buckets a reference at."""
    from PIL import Image

    aspect = image.width / image.height
    width = max(multiple, round((area * aspect) ** 0.5 / multiple) * multiple)
    height = max(multiple, round((area / aspect) ** 0.5 / multiple) * multiple)
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BICUBIC)


def input_image(height: int, width: int):
    """A fixed input image for sampling without one given (the tests' ``generate``): a blue square on white, in
    the demo images' style."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (250, 250, 250))
    ImageDraw.Draw(image).rectangle((width // 8, height // 8, width // 2, height // 2), fill=(40, 80, 220))
    return image


class FluxKontextModule(FluxModule):
    pipeline_class = lazy_class("diffusers.FluxKontextPipeline")
    conditioning_kinds: ClassVar[tuple[str, ...]] = ("reference",)  # a run without references is a config error
    references_own_bucket: ClassVar[bool] = True  # Kontext takes an input of any aspect ratio
    max_references: ClassVar[int] = 1  # FluxKontextPipeline takes one image
    control_class: ClassVar[str | None] = None  # FLUX.1's control LoRA is model=flux's, not Kontext's
    license = "other"  # the FLUX.1 [dev] non-commercial licence
    tiny_variants = ("flux-kontext",)

    @classmethod
    def card_notes(cls, model_cfg) -> list[str]:
        tokens = (model_cfg.get("options") or {}).get("t5_max_length", 512)
        return [
            *super().card_notes(model_cfg),
            "FLUX.1 Kontext edits an input image: sample with `FluxKontextPipeline`, the image to edit as `image=` and "
            f"the instruction as `prompt=`, `max_sequence_length={tokens}`; its guidance scale is an embedding (Kontext's "
            "usual 2.5) and there is no negative prompt. Training saw each input at its own aspect ratio and at the "
            "training resolution's area; by default the pipeline resizes input and output to about 1 megapixel.",
        ]

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        dtype, (b, _, h, w) = self.denoiser_dtype, noisy.shape
        (reference,) = self.reference_latents(batch)  # (B, 16, h_r, w_r): its own bucket's size
        h_r, w_r = reference.shape[-2:]
        prompt = cond["prompt_embeds"].to(dtype)  # (B, L, D_t5)
        guidance = None
        if self.transformer.config.guidance_embeds:  # Kontext [dev]: guidance-distilled, as Flux.1 dev
            guidance = torch.full((b,), self.options.guidance, device=self.device, dtype=torch.float32)
        target = pack(noisy.to(dtype))  # (B, h/2 * w/2, 64)
        out = self.transformer(
            hidden_states=torch.cat([target, pack(reference.to(dtype))], dim=1),  # (B, h/2 * w/2 + h_r/2 * w_r/2, 64)
            timestep=timesteps / self.noise.num_timesteps,  # sigma in [0, 1], as the pipeline passes it
            guidance=guidance,
            pooled_projections=cond["pooled"].to(dtype),
            encoder_hidden_states=prompt,
            txt_ids=torch.zeros(prompt.shape[1], 3, device=self.device, dtype=dtype),
            img_ids=torch.cat([image_ids(h, w, self.device, dtype), reference_ids(h_r, w_r, self.device, dtype)]),
            return_dict=False,
        )[0]
        return unpack(out[:, : target.shape[1]], h, w)  # the target's tokens only: (B, 16, h, w)

    @staticmethod
    def size_inputs(height: int, width: int) -> dict[str, Any]:
        """The pipeline's keywords that keep its output at ``height`` x ``width`` and its input at its own size
        (its defaults resize both to about 1 MP)."""
        return {"max_area": height * width, "_auto_resize": False}

    @classmethod
    def sampling_inputs(cls, height: int, width: int, pipe=None) -> dict[str, Any]:
        """At the asked size, with a fixed input image of that size to edit."""
        return {**cls.sampling_kwargs, **cls.size_inputs(height, width), "image": input_image(height, width)}

    @torch.no_grad()
    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        """The input (``image=``: validation's, one image or a list of one) at the asked area and its own aspect
        ratio, as training buckets a reference; without one, Kontext samples from the text alone. The guidance
        scale is the embedding's; there is no negative prompt."""
        kwargs.pop("negative_prompt", None)
        image = kwargs.pop("image", None)
        if isinstance(image, (list, tuple)):
            (image,) = image
        if image is not None:
            kwargs["image"] = at_area(image.convert("RGB"), kwargs["height"] * kwargs["width"])
        return sample_packed(
            self, pipe, prompt, autocast, **self.size_inputs(kwargs["height"], kwargs["width"]), **kwargs
        )
