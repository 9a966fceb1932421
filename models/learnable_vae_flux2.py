"""The learnable tiny FLUX.2 VAE: models/learnable_vae.py's ``AutoencoderKL`` set by construction (an 8x8 box
filter rotated into the latent channels, a nearly deterministic posterior, a decoder that inverts it; see
models/learnable.py for why) moved into an ``AutoencoderKLFlux2``, which has the very same encoder, decoder and
quant convs, plus the batch-norm statistics FLUX.2's pipelines normalise the 2x2-patchified latents by.

Those statistics are measured on the toy images: each patchified channel's own mean, and one variance shared by
all of them, so the normalised latents have zero mean and unit variance overall. The real statistics are per
channel; a shared variance keeps the rotation's geometry and leaves the posterior's small noise equally small in
every channel (a channel the rotation gives little of the image would otherwise have it magnified).
"""

from __future__ import annotations

import torch

from models.learnable_vae import learnable_vae, toy_images

# the AutoencoderKL config keys AutoencoderKLFlux2 shares (it has no scaling or shift factor)
SHARED = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "act_fn", "latent_channels", "norm_num_groups", "sample_size", "use_quant_conv", "use_post_quant_conv",
    "mid_block_add_attention",
)


@torch.no_grad()
def make_flux2_vae(config, seed: int = 0):
    """A learnable ``AutoencoderKLFlux2`` of ``config``'s latent width, and what was measured of it."""
    from diffusers import AutoencoderKLFlux2

    from models.flux2 import patchify, unpatchify

    base = learnable_vae(config.latent_channels, False, bool(config.use_quant_conv), seed)
    vae = AutoencoderKLFlux2(**{key: base.config[key] for key in SHARED})
    missing, unexpected = vae.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("bn.") for key in missing), (missing, unexpected)
    images = toy_images(64, 64, torch.Generator().manual_seed(seed))
    latents = patchify(vae.encode(images).latent_dist.mean)  # (N, 4C, 8, 8)
    mean = latents.mean(dim=(0, 2, 3))
    variance = float((latents - mean.view(1, -1, 1, 1)).pow(2).mean())
    vae.bn.running_mean.copy_(mean)
    vae.bn.running_var.fill_(variance - vae.config.batch_norm_eps)  # the pipelines add eps back
    vae.eval()
    normalised = (latents - mean.view(1, -1, 1, 1)) / variance**0.5
    recon = vae.decode(unpatchify(normalised * variance**0.5 + mean.view(1, -1, 1, 1))).sample
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 8), scale_factor=8)
    return vae, {
        "posterior_std": float(vae.encode(images).latent_dist.std.mean()),
        "latent_mean": float(normalised.mean()),
        "latent_std": float(normalised.std()),
        "reconstruction_mse_vs_8x8_blocks": float((recon - blocks).pow(2).mean()),
    }
