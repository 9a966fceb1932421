"""The frozen encoders' side of a family module: the image encoding the latent cache stores (a VAE
posterior; nothing for a pixel-space family), prompt conditioning for the text-embedding cache, caption dropout on cached conditioning, and moving the encoders off the
accelerator once the caches hold what they would compute. Mixed into ``DiffusionModule``."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch

# How a pipeline rewrites a prompt before its tokenizer sees it, by the name a family declares
# (``prompt_preprocessing``). T5 is case-sensitive, so training must send the very text sampling sends.
PROMPT_PREPROCESSING = {
    "": lambda text: text,
    # IF's and PixArt's pipelines' ``_text_preprocessing`` with ``clean_caption=False``
    "lower_strip": lambda text: text.lower().strip(),
}


def t5_with_mask(
    tokenizer, encoder, captions: Sequence[str], max_length: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's hidden states (B, L, D) over ``max_length`` tokens and the tokenizer's attention mask (B, L), 1 for
    tokens and 0 for padding, which the encoder is given: as PixArt's and IF's pipelines encode prompts."""
    tokens = tokenizer(
        list(captions),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    mask = tokens.attention_mask.to(device)
    return encoder(tokens.input_ids.to(device), attention_mask=mask)[0], mask


class EncodersMixin:
    #: how the family's pipeline rewrites prompts before encoding them (a ``PROMPT_PREPROCESSING`` name)
    prompt_preprocessing: ClassVar[str] = ""

    def pipeline_prompts(self, captions: Sequence[str]) -> list[str]:
        """The captions as the family's pipeline would pass them to its tokenizer."""
        return [PROMPT_PREPROCESSING[self.prompt_preprocessing](c) for c in captions]

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], (B, 3, H, W) -> their deterministic encoding, what the image cache stores:
        the VAE posterior's mean and log-variance (B, 2C, H/8, W/8). A pixel-space family trains on the
        pixels themselves, so they pass through (and it has no image cache: ``data_encoders``).

        The posterior sample is drawn per step (``model_inputs``) exactly as without a cache.
        """
        if not self.latent_space:
            return pixels.to(self.device)
        # Lightning's autocast covers the whole step; a VAE kept in fp32 must also compute in fp32.
        keep_fp32 = torch.autocast(self.device.type, enabled=False) if self.vae_in_fp32 else nullcontext()
        with keep_fp32:
            return self.vae.encode(pixels.to(self.vae.device, self.vae_dtype)).latent_dist.parameters

    def model_inputs(self, encoded: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What the denoiser trains on, from ``encode_pixels``'s output: a posterior sample shifted and
        scaled into the latent space (B, C, H/8, W/8), or the pixels of a pixel-space family."""
        if not self.latent_space:
            return encoded.to(self.device)
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents = DiagonalGaussianDistribution(encoded.to(self.device)).sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1], (B, 3, H, W) -> what the denoiser trains on (scaled latents or pixels)."""
        return self.model_inputs(self.encode_pixels(pixels), generator)

    @torch.no_grad()
    def unconditional(self) -> dict[str, torch.Tensor]:
        """The empty prompt's conditioning (batch of 1), kept so a dropped caption needs no text encoder."""
        if getattr(self, "_uncond", None) is None:
            self._uncond = {k: v[:1].detach() for k, v in self.encode_prompts([""]).items()}
        return self._uncond

    def drop_cond(self, cond: dict[str, torch.Tensor], dropped: list[bool]) -> dict[str, torch.Tensor]:
        """Cached conditioning with the dropped rows replaced by the unconditional one."""
        if not any(dropped):
            return cond
        uncond = self.unconditional()
        out = {}
        for key, value in cond.items():
            mask = torch.tensor(dropped, device=value.device).view(-1, *([1] * (value.ndim - 1)))
            out[key] = torch.where(mask, uncond[key].to(value), value)
        return out

    def _weights_fingerprint(self, subfolders: Sequence[str]) -> str:
        """What identifies the weights in ``subfolders`` of the checkpoint: for a local folder the files'
        names, sizes and mtimes (a swapped-in VAE changes it); for a Hub id the snapshot's commit."""
        hp = self.hparams
        root = Path(hp.pretrained_model_name_or_path)
        parts: list[Any] = []
        for sub in subfolders:
            if root.is_dir():
                parts += [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted((root / sub).glob("*"))]
            else:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(str(root), f"{sub}/config.json", revision=hp.revision)
                parts.append(Path(cached).parts[-3] if isinstance(cached, str) else hp.revision)
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    def data_encoders(self) -> dict[str, Any]:
        """What the data module's latent and text-embedding caches need of this model (see run.py)."""
        hp = self.hparams
        base = f"{hp.pretrained_model_name_or_path}@{hp.revision}:{hp.variant}:{type(self).__name__}"
        text_parts = [n for n, _ in self.named_children() if n.startswith("text_encoder")]
        text_parts += [n for n in vars(self) if n.startswith("tokenizer")]
        # ("encoded": entries are stored under that key; older caches' entries are not matched)
        vae_id = f"{base}:vae:encoded:{self.vae_dtype}:{self._weights_fingerprint(['vae'])}"
        levels = ",".join(f"{k}={v}" for k, v in sorted(self.text_encoder_levels().items()))
        text_id = (
            f"{base}:text:{self.text_dtype}:{levels}:{self.options}:{self._weights_fingerprint(sorted(text_parts))}"
        )
        if self.prompt_preprocessing:  # entries of the raw captions (older caches) are not matched
            text_id += f":prompts={self.prompt_preprocessing}"
        return {
            # a pixel-space family has nothing worth caching of its images: they are read each step
            "encode_pixels": self.encode_pixels if self.latent_space else None,
            "encode_prompts": self.encode_prompts,
            "identity": {"vae": vae_id, "text": text_id},
            "offload": self.offload_encoders,
        }

    def encoders_on_device(self):
        """Bring offloaded VAE and text encoders back to the compute device (for sampling); returns a
        function that puts them back where they were."""
        moved = []
        for name, module in self.named_children():
            if name == "vae" or name.startswith("text_encoder"):
                where = next(module.parameters()).device
                if where != self.device:
                    module.to(self.device)
                    moved.append((module, where))

        def restore() -> None:
            for module, where in moved:
                module.to(where)

        return restore

    def offload_encoders(self, vae: bool, text: bool) -> None:
        """Move the VAE and/or text encoders off the accelerator once the caches hold what they would compute."""
        if text:
            self.unconditional()  # still needed for caption dropout
        for name, module in self.named_children():
            if (vae and name == "vae") or (text and name.startswith("text_encoder")):
                module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
