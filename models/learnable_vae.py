"""The learnable tiny pipelines' VAE, set by construction (see models/learnable.py for why and what): an
8x8 box filter rotated into the latent channels, a nearly deterministic posterior, factors that give the
latents unit variance, and a decoder that inverts it; and the toy images the factors are measured on."""

from __future__ import annotations

import torch

LOGVAR = -14.0  # posterior log-variance: std = exp(-7) ~ 1e-3
CONST = 40.0  # the constant channel beside the signals, against pixel values within [-1, 1]
LINEAR = 20.0  # the SiLU's operating point: silu(z) = z * (1 - ~1e-9) around z = 20
SIGNALS = 3  # RGB
WIDTH = 16  # channels in every block: two norm groups of 8 = 3 signals, their negatives, +-CONST


def learnable_vae(latent_channels: int, shift: bool, quant_convs: bool, seed: int = 0):
    """An ``AutoencoderKL`` (module docstring) with ``latent_channels`` latents, with or without the quant
    convs and a ``shift_factor``; its factors still to be set (``set_factors``)."""
    from diffusers import AutoencoderKL

    from models.tiny import VAE

    vae = AutoencoderKL(
        **{**VAE, "block_out_channels": (WIDTH,) * 4, "norm_num_groups": 2, "latent_channels": latent_channels},
        shift_factor=0.0 if shift else None,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )
    # a fixed orthonormal map from RGB into the latent channels (and its transpose back)
    q, _ = torch.linalg.qr(torch.randn(latent_channels, SIGNALS, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        _pass_through(vae.encoder)
        _pass_through(vae.decoder)
        _signals_in(vae.encoder.conv_in, torch.eye(SIGNALS))
        _signals_in(vae.decoder.conv_in, q.T)
        _norm_out(vae.encoder.conv_norm_out)
        _norm_out(vae.decoder.conv_norm_out)
        _signals_out(vae.encoder.conv_out, q)
        vae.encoder.conv_out.bias[latent_channels:] = LOGVAR
        _signals_out(vae.decoder.conv_out, torch.eye(SIGNALS))
        for conv in (vae.quant_conv, vae.post_quant_conv):
            if conv is not None:
                conv.weight[:, :, 0, 0] = torch.eye(conv.out_channels)
    return vae


def _pass_through(coder) -> None:
    """Every block passes its input on: residual branches and attention outputs stay zero (as zeroed),
    a down-sampler averages 2x2 (its stride-2 3x3 kernel's top-left taps: the asymmetric padding is never
    reached), an up-sampler's conv after the nearest-neighbour resize is the identity."""
    for module in coder.modules():
        name = type(module).__name__
        if name == "Downsample2D":
            for i in range(WIDTH):
                module.conv.weight[i, i, :2, :2] = 0.25
        elif name == "Upsample2D":
            for i in range(WIDTH):
                module.conv.weight[i, i, 1, 1] = 1.0
        elif name == "GroupNorm":
            module.weight.fill_(1.0)  # unused on the zeroed branches, but a norm of all zeros reads oddly


def _signals_in(conv, mix: torch.Tensor) -> None:
    """``conv`` (3x3, centre tap) writes ``mix @ input`` to channels 0-2, its negative to 3-5, and +-CONST
    to 6-7; channels 8-15 repeat them, so both norm groups have the same form."""
    for group in (0, 8):
        conv.weight[group : group + SIGNALS, :, 1, 1] = mix
        conv.weight[group + SIGNALS : group + 2 * SIGNALS, :, 1, 1] = -mix
        conv.bias[group + 6] = CONST
        conv.bias[group + 7] = -CONST


def _norm_out(norm) -> None:
    """A group of [a, -a, CONST, -CONST] has mean 0 and variance (|a|^2 + CONST^2) / 4, i.e. std CONST / 2 to
    within 0.2% for |a| <= 1: scaling by CONST / 2 gives ``a`` back; shifted by LINEAR for the SiLU."""
    norm.weight.fill_(CONST / 2)
    norm.bias.fill_(LINEAR)


def _signals_out(conv, mix: torch.Tensor) -> None:
    """``conv`` (centre tap) reads the signals (channels 0-2, each LINEAR too high) into ``mix @ signals``."""
    conv.weight[: mix.shape[0], :SIGNALS, 1, 1] = mix
    conv.bias[: mix.shape[0]] = -LINEAR * mix.sum(dim=1)


def toy_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` images (n, 3, size, size) in [-1, 1]: a plain background with one to three rectangles or
    ellipses, every colour and box drawn from ``generator``."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        image = torch.rand(3, 1, 1, generator=generator).expand(3, size, size).clone()
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            cx, cy, rx, ry = (torch.rand(4, generator=generator) * torch.tensor([1, 1, 0.35, 0.35]) + torch.tensor([0, 0, 0.08, 0.08])) * size
            if torch.rand(1, generator=generator) < 0.5:
                inside = ((xs - cx).abs() <= rx) & ((ys - cy).abs() <= ry)
            else:
                inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
            image[:, inside] = torch.rand(3, 1, generator=generator)
        out[i] = image * 2 - 1
    return out


@torch.no_grad()
def set_factors(vae, images: torch.Tensor) -> dict[str, float]:
    """Give ``vae``'s latents of ``images`` zero mean and unit variance: its ``shift_factor`` (where it has
    one) and ``scaling_factor``; a VAE without a shift (SD's) has the channels' means folded into its quant
    convs' biases instead, exactly (both are 1x1). Returns what was measured on ``images``."""
    posterior = vae.encode(images).latent_dist
    mean = posterior.mean
    shift = float(mean.mean()) if vae.config.shift_factor is not None else 0.0
    if vae.config.shift_factor is None and vae.quant_conv is not None:
        centre = mean.mean(dim=(0, 2, 3))
        vae.quant_conv.bias[: centre.numel()] -= centre
        vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ centre
        mean = mean - centre.view(1, -1, 1, 1)
    scale = 1.0 / float((mean - shift).std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift if vae.config.shift_factor is not None else None)
    encoded = vae.encode(images).latent_dist
    blocks = torch.nn.functional.avg_pool2d(images, 8)
    target = torch.nn.functional.interpolate(blocks, scale_factor=8, mode="nearest")
    recon = vae.decode(encoded.mean).sample
    latents = (encoded.mean - shift) * scale
    return {
        "posterior_std": float(encoded.std.mean()),
        "latent_mean": float(latents.mean()),
        "latent_std": float(latents.std()),
        "scaling_factor": scale,
        "shift_factor": shift,
        "reconstruction_mse": float((recon - images).pow(2).mean()),
        "reconstruction_mse_vs_8x8_blocks": float((recon - target).pow(2).mean()),
    }
