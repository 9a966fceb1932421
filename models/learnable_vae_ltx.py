"""The learnable tiny LTX-Video VAE, set by construction as models/learnable_vae.py sets an ``AutoencoderKL`` (see
models/learnable.py for why): still an ``AutoencoderKLLTXVideo`` of 0.9.0's layout (causal encoder, non-causal
decoder, three 2x space-time steps), 16 channels a block, 16 latent channels, but without residual blocks and with
no 4x patching, so it compresses 8x in space and 8x in time (clips of 8k + 1 frames, one frame an image).

- The encoder is an 8x8 box filter of the image's RGB, rotated into the latent channels by a fixed orthonormal map:
  its stride-2 space-time convolutions average 2x2 pixels of two frames, the current and the one before, so latent
  frame 0 is input frame 0 alone (the causal padding repeats it) and latent frame k >= 1 the mean of frames
  8k - 7 ... 8k, as a real causal video VAE packs one frame first and then 8 at a time. A clip's first latent frame
  is therefore sharp and the later ones smeared along the motion: the only cue a transformer with relative positions
  in time has of which frame comes first (without it, the motion task learned the axis of a motion but not its
  direction: bench/README.md). The one norm that cannot be bypassed (``norm_out``, an RMS norm over channels with no affine) sees each
  signal as ``LINEAR + a`` beside ``LINEAR - a`` and a large constant, so it divides by a constant (to ~1e-6);
  ``conv_out`` reads ``a`` as half the pair's difference after the SiLU, over the SiLU's slope there (the even
  orders cancel in the difference) and times the norm's divisor.
- Its latents also mark the top row and the left column of the latent grid (two more signals in the same
  orthonormal map, from the last down-sampler's zero padding, the only absolute position a convolution has). The
  LTX transformer has no absolute position code: RoPE in self-attention is relative and cross-attention has none,
  so a tiny one reads where a token is only from the grid's edges, which pure noise hides (at 1000 steps without
  the marks: 0.25, chance, with 1 or 2 blocks; the text's effect on the output shrank as it trained). With the
  marks in the (noisy) latents, attention relative to the marked tokens tells a token where it is, as a real
  model's many layers learn from the edges. The decoder reads the RGB signals only.
- The posterior is nearly deterministic: the encoder's one log-variance channel (which it repeats) is ``LOGVAR``.
- ``latents_mean`` / ``latents_std`` (the VAE's buffers, the pipeline's per-channel normalisation) give every
  channel zero mean and unit variance on images; ``scaling_factor`` stays 1.
- The decoder inverts it: the latents back to RGB, each up-sampler copying a value to its 2x2x2 block (the first
  frame's copy dropped, as the causal layout does), so a latent frame k >= 1 decodes to 8 equal frames, their mean.
"""

from __future__ import annotations

import torch

from models.learnable_vae import toy_images

LOGVAR = -18.0  # posterior log-variance: std = exp(-9) ~ 1e-4
CONST = 1000.0  # the constant channel: the norm's relative error is ~|a|^2 / CONST^2
LINEAR = 20.0  # the pair's offset
SIGNALS = 3  # RGB
MARKS = 2  # the top row's and the left column's marks (latent channels 7-8 and 9-10: LINEAR + m, LINEAR - m)
WIDTH = 16  # channels in every block: LINEAR + a (0-2), LINEAR - a (3-5), CONST (6), the marks, the rest zero
USED = 2 * SIGNALS + 1
LATENTS = 16


def _divisor(pairs: int) -> float:
    """What the RMS norm over ``WIDTH`` channels holding ``pairs`` pairs and the constant divides by (for a = 0;
    |a| <= sqrt(3) moves it by ~3e-6)."""
    return ((2 * pairs * LINEAR**2 + CONST**2) / WIDTH) ** 0.5


def _gain(pairs: int) -> float:
    """Half the pair's difference after norm and SiLU is a times this (the SiLU's slope at the offset, over the
    norm's divisor); a reader multiplies by its inverse."""
    u = torch.tensor(LINEAR / _divisor(pairs), dtype=torch.float64)
    s = torch.sigmoid(u)
    return float(s * (1 + u * (1 - s))) / _divisor(pairs)


def learnable_ltx_vae(seed: int = 0):
    """An ``AutoencoderKLLTXVideo`` as the module docstring says, its normalisation still to be set."""
    from diffusers import AutoencoderKLLTXVideo

    vae = AutoencoderKLLTXVideo(
        latent_channels=LATENTS,
        block_out_channels=(WIDTH,) * 4,
        decoder_block_out_channels=(WIDTH,) * 4,
        layers_per_block=(0,) * 5,
        decoder_layers_per_block=(0,) * 5,
        patch_size=1,
    )
    q, _ = torch.linalg.qr(torch.randn(LATENTS, SIGNALS + MARKS, generator=torch.Generator().manual_seed(seed)))  # (16, 5)
    enc, dec = vae.encoder, vae.decoder
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        _signals_in(enc.conv_in.conv, torch.eye(SIGNALS), tap=-1)  # causal: the current frame is the last tap
        for block in enc.down_blocks:
            for down in block.downsamplers or ():
                for i in range(USED):
                    down.conv.weight[i, i, 1:3, 1:3, 1:3] = 0.125  # frames 2t - 1 and 2t, rows and columns 2i, 2i+1
        _marks(enc.down_blocks[2].downsamplers[0].conv)
        _signals_out(enc.conv_out.conv, q, tap=-1)
        enc.conv_out.conv.bias[LATENTS] = LOGVAR
        _signals_in(dec.conv_in.conv, q[:, :SIGNALS].T, tap=1)  # non-causal: the centre tap; RGB only
        for block in dec.up_blocks:
            for up in block.upsamplers or ():
                per = up.stride[0] * up.stride[1] * up.stride[2]
                for i in range(USED):
                    up.conv.conv.weight[i * per : (i + 1) * per, i, 1, 1, 1] = 1.0
        _signals_out(dec.conv_out.conv, torch.eye(SIGNALS), tap=1)
    return vae


def _signals_in(conv, mix: torch.Tensor, tap: int) -> None:
    """``conv`` writes ``LINEAR + mix @ input`` to channels 0-2, ``LINEAR - mix @ input`` to 3-5, CONST to 6."""
    w = conv.weight[:, :, tap, 1, 1]
    w[:SIGNALS, : mix.shape[1]] = mix
    w[SIGNALS : 2 * SIGNALS, : mix.shape[1]] = -mix
    conv.bias[: 2 * SIGNALS] = LINEAR
    conv.bias[2 * SIGNALS] = CONST


def _marks(conv) -> None:
    """The last down-sampler (stride 2, zero padding) writes ``LINEAR + m`` and ``LINEAR - m`` for each mark: m is 1
    where its tap one row up (one column left) of the constant channel falls in the padding, the top row (left
    column) of its output, and 0 elsewhere."""
    for k, (row, col) in enumerate(((0, 1), (1, 0))):  # the tap above, the tap to the left
        plus, minus = USED + 2 * k, USED + 2 * k + 1
        conv.weight[plus, 2 * SIGNALS, -1, row, col] = -1 / CONST
        conv.weight[minus, 2 * SIGNALS, -1, row, col] = 1 / CONST
        conv.bias[plus], conv.bias[minus] = LINEAR + 1, LINEAR - 1


def _signals_out(conv, mix: torch.Tensor, tap: int) -> None:
    """``conv`` reads ``mix @ a`` from half the difference of channels 0-2 and 3-5 after the norm and SiLU (and,
    where ``mix`` has their columns, the marks' from 7-8 and 9-10)."""
    w, gain = conv.weight[:, :, tap, 1, 1], _gain(mix.shape[1])
    w[: mix.shape[0], :SIGNALS] = mix[:, :SIGNALS] / (2 * gain)
    w[: mix.shape[0], SIGNALS : 2 * SIGNALS] = -mix[:, :SIGNALS] / (2 * gain)
    for k in range(mix.shape[1] - SIGNALS):
        w[: mix.shape[0], USED + 2 * k] = mix[:, SIGNALS + k] / (2 * gain)
        w[: mix.shape[0], USED + 2 * k + 1] = -mix[:, SIGNALS + k] / (2 * gain)


@torch.no_grad()
def set_latent_stats(vae, images: torch.Tensor) -> dict[str, float]:
    """Give every latent channel of ``images`` (N, 3, H, W) zero mean and unit variance through the VAE's
    ``latents_mean`` / ``latents_std`` buffers. Returns what was measured."""
    frames = images[:, :, None]  # (N, 3, 1, H, W)
    mean = vae.encode(frames).latent_dist.mean  # (N, 16, 1, h, w)
    centre, spread = mean.mean(dim=(0, 2, 3, 4)), mean.std(dim=(0, 2, 3, 4))
    vae.latents_mean.copy_(centre)
    vae.latents_std.copy_(spread)
    posterior = vae.encode(frames).latent_dist
    latents = (posterior.mean - centre.view(1, -1, 1, 1, 1)) / spread.view(1, -1, 1, 1, 1)
    recon = vae.decode(posterior.mean).sample[:, :, 0]
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 8), scale_factor=8, mode="nearest")
    return {
        "posterior_std_over_latent_std": float((posterior.std / spread.view(1, -1, 1, 1, 1)).max()),
        "latent_mean": float(latents.mean()),
        "latent_std": float(latents.std()),
        "latent_std_min_channel": float(latents.std(dim=(0, 2, 3, 4)).min()),
        "reconstruction_mse": float((recon - images).pow(2).mean()),
        "reconstruction_mse_vs_8x8_blocks": float((recon - blocks).pow(2).mean()),
    }


def make_ltx_vae(seed: int = 0) -> tuple[object, dict[str, float]]:
    """The learnable VAE with its normalisation measured on toy images, and what was measured."""
    vae = learnable_ltx_vae(seed)
    return vae, set_latent_stats(vae, toy_images(64, 64, torch.Generator().manual_seed(seed)))
