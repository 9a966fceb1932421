"""The learnable tiny Qwen-Image VAE, set by construction as models/learnable_vae.py sets an ``AutoencoderKL``
(see models/learnable.py for why): still an ``AutoencoderKLQwenImage`` (causal 3-D convolutions, RMS norms,
one-frame videos), 16 channels a block, 16 latent channels.

- The encoder is an 8x8 box filter of the image's RGB, rotated into the latent channels by a fixed orthonormal
  map: residual branches and the mid-block attention's output are zero, each down-sampler averages 2x2 (a
  single frame never reaches the temporal convolutions). The one norm that cannot be bypassed (``norm_out``,
  an RMS norm over channels with no bias) sees each signal as ``LINEAR + a`` beside ``LINEAR - a`` and a large
  constant: the pair's first-order terms cancel in the norm, so it is constant to ~1e-6 and ``gamma`` undoes
  it, and the SiLU after it works at +-LINEAR, in its linear range; ``conv_out`` reads ``a`` as half the pair's
  difference, so the offset cancels too.
- The posterior is nearly deterministic: the log-variance half of ``conv_out`` is the constant ``LOGVAR``.
- ``latents_mean`` / ``latents_std`` (the per-channel normalisation the pipeline undoes before decoding) give
  every channel zero mean and unit variance on images.
- The decoder inverts it: the latents back to RGB, up-sampled (nearest) to 8x8 blocks; where an up-sampler
  halves the channels, the next block's shortcut widens them back.
"""

from __future__ import annotations

import torch

from models.learnable_vae import toy_images

LOGVAR = -18.0  # posterior log-variance: std = exp(-9) ~ 1e-4, small against every channel's spread
CONST = 1000.0  # the constant channel beside the signals: the norm's relative error is ~|a|^2 / CONST^2
LINEAR = 20.0  # the SiLU's operating point: silu(z) = z * (1 - ~1e-8) around z = 20
SIGNALS = 3  # RGB
WIDTH = 16  # channels in every block: LINEAR + a (0-2), LINEAR - a (3-5), CONST (6), the rest zero
USED = 2 * SIGNALS + 1


def learnable_qwen_vae(seed: int = 0):
    """An ``AutoencoderKLQwenImage`` as the module docstring says, its normalisation still to be set
    (``set_latent_stats``)."""
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(base_dim=WIDTH, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    z_dim = vae.config.z_dim
    q, _ = torch.linalg.qr(torch.randn(z_dim, SIGNALS, generator=torch.Generator().manual_seed(seed)))  # (16, 3)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        _pass_through(vae.encoder)
        _pass_through(vae.decoder)
        _signals_in(vae.encoder.conv_in, torch.eye(SIGNALS))
        _signals_in(vae.decoder.conv_in, q.T)
        _norm_out(vae.encoder.norm_out)
        _norm_out(vae.decoder.norm_out)
        _signals_out(vae.encoder.conv_out, q)
        vae.encoder.conv_out.bias[z_dim:] = LOGVAR
        _signals_out(vae.decoder.conv_out, torch.eye(SIGNALS))
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight[:, :, 0, 0, 0] = torch.eye(conv.out_channels)
    return vae


def _centre(conv) -> torch.Tensor:
    """A causal 3x3x3 convolution's (out, in) tap on the current frame's pixel itself (its last temporal tap:
    the two before it see the causal zero padding of a single frame)."""
    return conv.weight[:, :, -1, conv.weight.shape[3] // 2, conv.weight.shape[4] // 2]


def _pass_through(coder) -> None:
    """Every block passes the used channels on: residual branches and attention outputs stay zero (as zeroed),
    a down-sampler averages 2x2 (its stride-2 kernel's top-left taps; the right/bottom padding is never
    reached), an up-sampler's conv after the nearest-neighbour resize keeps them (it halves the width), and
    a shortcut that widens a block back copies them."""
    for module in coder.modules():
        name = type(module).__name__
        if name == "QwenImageResample" and module.mode.startswith("down"):
            for i in range(USED):
                module.resample[1].weight[i, i, :2, :2] = 0.25
        elif name == "QwenImageResample" and module.mode.startswith("up"):
            for i in range(USED):
                module.resample[1].weight[i, i, 1, 1] = 1.0
        elif name == "QwenImageResidualBlock" and isinstance(module.conv_shortcut, torch.nn.Conv3d):
            for i in range(USED):
                module.conv_shortcut.weight[i, i] = 1.0
        elif name == "QwenImageRMS_norm":
            module.gamma.fill_(1.0)  # unused on the zeroed branches, but a norm of all zeros reads oddly


def _signals_in(conv, mix: torch.Tensor) -> None:
    """``conv`` writes ``LINEAR + mix @ input`` to channels 0-2, ``LINEAR - mix @ input`` to 3-5, CONST to 6."""
    tap = _centre(conv)
    tap[:SIGNALS, : mix.shape[1]] = mix
    tap[SIGNALS : 2 * SIGNALS, : mix.shape[1]] = -mix
    conv.bias[: 2 * SIGNALS] = LINEAR
    conv.bias[2 * SIGNALS] = CONST


def _norm_out(norm) -> None:
    """An RMS norm over ``WIDTH`` channels divides by ||x|| / sqrt(WIDTH), with ||x||^2 = 6 LINEAR^2 + CONST^2
    + 2 |a|^2: ``gamma`` multiplies that back (for a = 0; |a| <= sqrt(3) moves it by ~3e-6)."""
    norm.gamma.fill_((6 * LINEAR**2 + CONST**2) ** 0.5 / WIDTH**0.5)


def _signals_out(conv, mix: torch.Tensor) -> None:
    """``conv`` reads ``mix @ a`` from half the difference of channels 0-2 and 3-5 (the offsets cancel)."""
    tap = _centre(conv)
    tap[: mix.shape[0], :SIGNALS] = mix / 2
    tap[: mix.shape[0], SIGNALS : 2 * SIGNALS] = -mix / 2


@torch.no_grad()
def set_latent_stats(vae, images: torch.Tensor, block: int = 8) -> dict[str, float]:
    """Give every latent channel of ``images`` (N, 3, H, W) zero mean and unit variance through the config's
    ``latents_mean`` / ``latents_std``. Returns what was measured (the reconstruction against ``block`` x
    ``block`` box filters, the VAE's own)."""
    frames = images[:, :, None]  # (N, 3, 1, H, W)
    mean = vae.encode(frames).latent_dist.mean  # (N, 16, 1, h, w)
    centre, spread = mean.mean(dim=(0, 2, 3, 4)), mean.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=centre.tolist(), latents_std=spread.tolist())
    posterior = vae.encode(frames).latent_dist
    latents = (posterior.mean - centre.view(1, -1, 1, 1, 1)) / spread.view(1, -1, 1, 1, 1)
    recon = vae.decode(posterior.mean).sample[:, :, 0]
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, block), scale_factor=block, mode="nearest")
    return {
        "posterior_std_over_latent_std": float((posterior.std / spread.view(1, -1, 1, 1, 1)).max()),
        "latent_mean": float(latents.mean()),
        "latent_std": float(latents.std()),
        "latent_std_min_channel": float(latents.std(dim=(0, 2, 3, 4)).min()),
        "reconstruction_mse": float((recon - images).pow(2).mean()),
        "reconstruction_mse_vs_blocks": float((recon - blocks).pow(2).mean()),
    }


def make_qwen_vae(seed: int = 0) -> tuple[object, dict[str, float]]:
    """The learnable VAE with its normalisation measured on toy images, and what was measured."""
    vae = learnable_qwen_vae(seed)
    return vae, set_latent_stats(vae, toy_images(64, 64, torch.Generator().manual_seed(seed)))
