"""The learnable tiny Wan 2.1 VAE: models/learnable_vae_qwen.py's VAE (Qwen-Image's VAE is Wan 2.1's, the same
modules and weight names) loaded into an ``AutoencoderKLWan``, its ``latents_mean`` / ``latents_std`` measured
on toy images. It is built for one-frame clips (the temporal convolutions are zero): images, as the learning
benchmark trains on. Wan 2.2's 48-channel residual VAE has no learnable version yet."""

from __future__ import annotations

import torch

from models.learnable_vae import toy_images
from models.learnable_vae_qwen import WIDTH, learnable_qwen_vae, set_latent_stats


def make_wan_vae(config, seed: int = 0) -> tuple[object, dict[str, float]]:
    """A learnable ``AutoencoderKLWan`` for the tiny VAE of ``config`` (Wan 2.1's: 16 channels, not residual),
    and what was measured."""
    from diffusers import AutoencoderKLWan

    if config.is_residual or config.z_dim != 16:
        raise NotImplementedError("a learnable Wan 2.2 VAE (48 channels, residual) is not built yet; use wan21")
    vae = AutoencoderKLWan(base_dim=WIDTH, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    vae.load_state_dict(learnable_qwen_vae(seed).state_dict(), strict=True)
    return vae, set_latent_stats(vae, toy_images(64, 64, torch.Generator().manual_seed(seed)))
