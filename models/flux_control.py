"""FLUX.1 control LoRA (``model=flux model.control=lora``): Flux.1 steered by a control image (canny edges, a depth
map, a pose), trained as diffusers' ``examples/flux-control/train_control_lora_flux.py`` does and sampled with
``FluxControlPipeline`` (BFL's FLUX.1 Canny/Depth [dev] LoRAs are this kind).

Everything of Flux.1 holds (models/flux.py). What the control pipeline adds, and so what training adds:

- The control image's latents are a VAE posterior **sample**, shifted and scaled (the pipeline's
  ``vae.encode(control).latent_dist.sample(generator)``, not the mode an edit family's reference takes), packed 2x2
  like the target's and concatenated on **channels** to the packed noisy latents: (B, N, 64 + 64). The sequence, its
  image ids, the timestep and the guidance embedding are plain Flux's; the prediction is the transformer's whole
  output (64 features a token), never noised control. The sample is the step generator's first draw, so a resumed
  run draws it again.
- ``transformer.x_embedder`` is widened to twice its inputs, the new columns zero and the old the base's, and the
  config's ``in_channels`` doubled (``out_channels`` pinned to the old width), as the script does before adding its
  LoRA: at step 0 the model is the base, whatever the control. ``x_embedder`` is always a LoRA target, so the LoRA
  alone carries what the control does: ``FluxControlPipeline.load_lora_weights`` widens a base checkpoint's
  ``x_embedder`` (zero columns) when a LoRA's ``lora_A`` is wider, which is exactly the frozen widened layer here.
  A checkpoint that is a control model already (``in_channels`` twice the output's: FLUX.1 Canny [dev]) is kept.
- A full fine-tune exports the whole ``FluxControlPipeline``, the widened transformer included.
- Validation's input image (``image=``) is the ``control_image``, brought to the asked size as training crops it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from models.base import lazy_class
from models.flux import FluxModule, sample_packed
from models.flux_kontext import input_image

EMBEDDER = "x_embedder"  # the patch embedding that takes the control latents' channels


def _name(value: Any) -> str:
    """An enum's value (the config's typed fields) or the string itself."""
    return str(getattr(value, "value", value))


@torch.no_grad()
def widen_x_embedder(transformer: torch.nn.Module) -> None:
    """``x_embedder`` (D, 4C) -> (D, 8C): the base's weight in the first 4C input columns, zeros in the control's,
    the bias kept; ``in_channels`` doubled and ``out_channels`` pinned, so the pipeline reads 16 latent channels
    (``in_channels // 8``) and a saved config rebuilds the same output layer. A no-op on a control checkpoint."""
    old, out_channels = transformer.x_embedder, transformer.out_channels
    if transformer.config.in_channels == 2 * out_channels:
        return
    wide = torch.nn.Linear(
        2 * old.in_features,
        old.out_features,
        bias=old.bias is not None,
        dtype=old.weight.dtype,
        device=old.weight.device,
    )
    wide.weight.zero_()
    wide.weight[:, : old.in_features].copy_(old.weight)
    if old.bias is not None:
        wide.bias.copy_(old.bias)
    transformer.x_embedder = wide
    transformer.register_to_config(in_channels=2 * old.in_features, out_channels=out_channels)


def fit(image, height: int, width: int):
    """``image`` (PIL) scaled to cover ``height`` x ``width`` and centre-cropped to it: what training's bucket and
    crop do to a control image (the pipeline would stretch it)."""
    from PIL import Image, ImageOps

    return ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)


class FluxControlModule(FluxModule):
    pipeline_class = lazy_class("diffusers.FluxControlPipeline")
    conditioning_kinds: ClassVar[tuple[str, ...]] = ("control",)  # a run without control images is a config error
    # the script's targets: attention, the double-stream blocks' feed-forwards, and x_embedder, which every preset
    # and list gets too (``lora_targets``)
    default_lora_targets = (
        *FluxModule.default_lora_targets,
        *("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
        EMBEDDER,
    )

    @classmethod
    def lora_targets(cls, target_modules) -> list[str]:
        """The resolved targets, ``x_embedder`` always among them: without its LoRA the control's columns stay zero
        and the saved LoRA could not widen the base's layer when loaded (the script appends it too)."""
        targets = super().lora_targets(target_modules)
        return targets if EMBEDDER in targets else [*targets, EMBEDDER]

    @classmethod
    def check_config(cls, model_cfg) -> None:
        super().check_config(model_cfg)
        if model_cfg.family != "flux":  # a Flux.1 subclass (Kontext) inherits control_class
            raise ValueError(
                f"model.control=lora trains FLUX.1's control LoRA (model=flux), not one for model={model_cfg.family}"
            )
        if _name(model_cfg.finetune) == "lycoris":
            raise ValueError(
                "model.control=lora trains a PEFT LoRA (x_embedder's widened inputs travel as its lora_A, which "
                "FluxControlPipeline.load_lora_weights expands the base by); use model.finetune=lora or full"
            )

    @classmethod
    def card_notes(cls, model_cfg) -> list[str]:
        options = model_cfg.get("options") or {}
        tokens, guidance = options.get("t5_max_length", 512), options.get("guidance", 1.0)
        return [
            *super().card_notes(model_cfg),
            "A FLUX.1 control LoRA: sample with `FluxControlPipeline.from_pretrained(<the base model>)` and "
            "`pipe.load_lora_weights(...)` (it widens the transformer's `x_embedder` to take the control latents), "
            f"the control image as `control_image=`, `max_sequence_length={tokens}`. Training fed the guidance "
            f"embedding {guidance}; there is no negative prompt. Give control images prepared as the training ones "
            "were (the same edge detector or depth model) at the output's size.",
        ]

    def load_components(self, path: str, common: dict) -> dict[str, Any]:
        if self.hparams.base_model_precision == "nf4-bnb":  # checked before the weights load
            raise ValueError(
                "model.control=lora widens x_embedder, which nf4-bnb loads as a 4-bit layer; use "
                "quantization=int8-quanto (applied after the widening)"
            )
        out = super().load_components(path, common)
        widen_x_embedder(out[self.denoiser_name])
        return out

    @torch.no_grad()
    def control_latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """The control image's latents (B, 16, h, w): a posterior sample from the cached encoding or the pixels,
        shifted and scaled, as ``FluxControlPipeline`` encodes its ``control_image``."""
        encoded = batch.get("control_encoded")
        if encoded is None:
            encoded = self.encode_pixels(batch["control_pixels"])  # (B, 32, h, w): mean and log-variance
        return self.model_inputs(encoded, generator).float()

    def compute_loss(self, batch: dict, generator: torch.Generator, fixed_level: float | None = None) -> torch.Tensor:
        """The shared loss, the control's posterior sample drawn first from the step's generator."""
        control = self.control_latents(batch, generator)
        return super().compute_loss({**batch, "control_latents": control}, generator, fixed_level)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        control = batch.get("control_latents")
        if control is None:  # a batch not from compute_loss: sampled from the global generator, as the pipeline's
            control = self.control_latents(batch)
        # ``pack`` keeps each channel's 2x2 patch together, so the tokens of the channel-concatenated latents are the
        # pipeline's packed latents then packed control, (B, N, 64 + 64); the output is the target's 64 features
        return super().denoise(torch.cat([noisy, control.to(noisy)], dim=1), timesteps, cond, batch)  # (B, 16, h, w)

    @classmethod
    def sampling_inputs(cls, height: int, width: int, pipe=None) -> dict[str, Any]:
        """At the asked size, with a fixed control image of that size."""
        return {**cls.sampling_kwargs, "control_image": input_image(height, width)}

    @torch.no_grad()
    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        """Validation's input (``image=``: one image or a list of one) is the control image, fitted to the asked
        size; the guidance scale is the embedding's, and there is no negative prompt."""
        kwargs.pop("negative_prompt", None)
        image = kwargs.pop("image", None)
        if isinstance(image, (list, tuple)):
            (image,) = image
        if image is None:
            raise ValueError("FluxControlPipeline samples from a control image: pass image= (validation's inputs)")
        control = fit(image, kwargs["height"], kwargs["width"])
        return sample_packed(self, pipe, prompt, autocast, control_image=control, **kwargs)
