"""The learnable tiny Wan 2.1 VAE: models/learnable_vae_qwen.py's VAE (Qwen-Image's VAE is Wan 2.1's, the same
modules and weight names) loaded into an ``AutoencoderKLWan``, its ``latents_mean`` / ``latents_std`` measured
on toy images; and Wan 2.2's 48-channel residual VAE (TI2V-5B's), built on the same pattern (``wan22_vae``).

It takes clips of F = 4k + 1 frames, laid out as the real one's latents are: frame 0 alone, then each group of 4
frames in one latent frame, 1/8 in space. Only the temporal convolutions (``time_conv``) of the resamplers are set
on top of the Qwen-Image VAE's weights (where they are zero), so one frame encodes and decodes bit for bit as
there; every other causal convolution reads only its last (current-frame) temporal tap, so nothing else mixes
frames.

- Encoding: latent frame 0 is frame 0's box filter, as for an image; latent frame j >= 1 is the same map of the
  mean of frames 4j-3 .. 4j. ``AutoencoderKLWan._encode`` runs frame 0 alone, then chunks of 4; a
  ``downsample3d`` resampler skips its ``time_conv`` on the first chunk and later prepends the previous chunk's
  last frame, so its stride-2, 3-tap kernel sees (previous, f1, f2), (f2, f3, f4): taps (0, 1/2, 1/2) average
  each pair, and the two such resamplers in a row average 4. Everything before them is affine per frame (the
  signals ride on constant offsets), so averaging there equals encoding the average.
- Decoding: latent frame 0 decodes to frame 0; latent frame j >= 1 to 4 copies of its image. The decoder runs
  one latent frame at a time; an ``upsample3d`` resampler skips its ``time_conv`` on the first and afterwards
  writes two frames per input frame from the two halves of its output channels: both halves copy the current
  frame (last tap only, so neither the causal zero padding nor the cached frames matter), and two in a row
  repeat it 4 times.

Wan 2.2's VAE (``is_residual``, a 2x2 pixel patch folded into 12 channels before the encoder, 48 latent channels at
1/16 in space, 1/4 in time) is set the same way, in its own layout: every convolution of the residual blocks and
resamplers is zero, so each down (up) block is its parameter-free shortcut alone, ``AvgDown3D`` (``DupUp3D``):
with the channels kept (all ``dim_mult`` 1) that is a 2x2 (2x2x2) average (nearest copy). ``conv_in`` reads the
patch's mean RGB, so a latent is a 16x16 box filter of its pixels (and of 4 frames, as above: the shortcut's
zero padding in time scales frame 0's channels alike, which the RMS norm undoes), and the decoder gives each
latent's RGB back to its 16x16 block.
"""

from __future__ import annotations

import torch

from models.learnable_vae import toy_images
from models.learnable_vae_qwen import CONST, SIGNALS, WIDTH, learnable_qwen_vae, set_latent_stats


def make_wan_vae(config, seed: int = 0) -> tuple[object, dict[str, float]]:
    """A learnable ``AutoencoderKLWan`` for the tiny VAE of ``config`` (Wan 2.1's: 16 channels, not residual),
    and what was measured."""
    from diffusers import AutoencoderKLWan

    if config.is_residual:
        vae = wan22_vae(config, seed)
    elif config.z_dim == 16:
        vae = AutoencoderKLWan(base_dim=WIDTH, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
        vae.load_state_dict(learnable_qwen_vae(seed).state_dict(), strict=True)
        _set_time_convs(vae)
    else:
        raise NotImplementedError(f"no learnable Wan VAE of {config.z_dim} channels without is_residual")
    _mark_borders(vae, seed)
    block = 8 * (getattr(config, "patch_size", None) or 1)
    return vae, set_latent_stats(vae, toy_images(64, 64, torch.Generator().manual_seed(seed)), block=block)


def wan22_vae(config, seed: int = 0):
    """Wan 2.2's residual VAE in ``config``'s latent layout (its z_dim, patch and temporal steps), set as the module
    docstring says; its ``latents_mean`` / ``latents_std`` still to be measured."""
    from diffusers import AutoencoderKLWan

    from models.learnable_vae_qwen import LOGVAR, _norm_out, _signals_in, _signals_out

    patch = config.patch_size or 1
    vae = AutoencoderKLWan(
        base_dim=WIDTH, z_dim=config.z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True,
        temperal_downsample=list(config.temperal_downsample), in_channels=3 * patch**2, out_channels=3 * patch**2,
        patch_size=config.patch_size, scale_factor_spatial=config.scale_factor_spatial,
        scale_factor_temporal=config.scale_factor_temporal,
    )
    z_dim = config.z_dim
    q, _ = torch.linalg.qr(torch.randn(z_dim, SIGNALS, generator=torch.Generator().manual_seed(seed)))
    # patchify puts colour c's 2x2 pixels in channels c * patch^2 ...: the encoder reads their mean, the decoder
    # writes each colour to all of them
    spread = torch.repeat_interleave(torch.eye(SIGNALS), patch**2, dim=1)  # (3, 3 patch^2)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for module in vae.modules():
            if type(module).__name__ == "WanRMS_norm":
                module.gamma.fill_(1.0)
        _signals_in(vae.encoder.conv_in, spread / patch**2)
        _signals_in(vae.decoder.conv_in, q.T)
        _norm_out(vae.encoder.norm_out)
        _norm_out(vae.decoder.norm_out)
        _signals_out(vae.encoder.conv_out, q)
        vae.encoder.conv_out.bias[z_dim:] = LOGVAR
        _signals_out(vae.decoder.conv_out, spread.T)
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight[:, :, 0, 0, 0] = torch.eye(conv.out_channels)
    return vae


# A real VAE's latents differ at the image's border (its convolutions' zero padding); the box filter's do not. A
# denoiser whose positions are only relative (Wan's rotary self-attention, nothing absolute) learns where a token
# is from such differences: without them the tiny Wan could not place a square in a quadrant at all (its prompt
# changed nothing: 0.25, chance, full fine-tune, whatever its width, depth or sequence length), while LTX-Video's
# learnable VAE, whose patchify leaves its top row and left column apart (~1 latent unit), learned it (1.00).
BORDER = 1.0  # the marker's size at an edge, in units of a latent channel's spread on toy images (corners 5/3)


@torch.no_grad()
def _mark_borders(vae, seed: int) -> None:
    """The encoder's ``conv_out`` adds a border marker along a latent direction the decoder does not read (outside
    the span of the RGB map ``q``): a 3x3 kernel on the constant channel (CONST) that sums to zero, so it cancels
    inside the image and leaves the padding's share at the edges. Decoding is unchanged."""
    conv = vae.encoder.conv_out
    tap = conv.weight[:, :, -1]  # (2 z, WIDTH, 3, 3): the current frame's spatial taps
    z_dim = vae.config.z_dim
    q = 2 * tap[:z_dim, :SIGNALS, 1, 1]  # (z, 3): _signals_out's map, orthonormal columns
    extra = torch.randn(z_dim, 1, generator=torch.Generator().manual_seed(seed + 1))
    basis, _ = torch.linalg.qr(torch.cat([q, extra], dim=1))
    u = basis[:, SIGNALS]  # a unit latent direction orthogonal to the decoder's
    spread = _latent_spread(vae)
    k = BORDER * spread / (3 * CONST)  # an edge pixel misses 3 of its 8 neighbours
    tap[:z_dim, 2 * SIGNALS] -= k * u[:, None, None]
    tap[:z_dim, 2 * SIGNALS, 1, 1] += 9 * k * u  # the centre: +8k after the neighbours' share


def _latent_spread(vae) -> float:
    """The latent channels' mean spread on toy images (before normalisation)."""
    images = toy_images(16, 64, torch.Generator().manual_seed(0))[:, :, None]
    return float(vae.encode(images).latent_dist.mean.std(dim=(0, 2, 3, 4)).mean())


@torch.no_grad()
def _set_time_convs(vae) -> None:
    """The resamplers' temporal convolutions, as the module docstring says: each encoder ``downsample3d`` averages
    the two newest of its three frames, each decoder ``upsample3d`` copies the current frame into both output
    halves. Raises if the VAE has none of either (they would be left zero: a clip's later frames garbage)."""
    down = up = 0
    for module in vae.encoder.modules():
        if type(module).__name__ == "WanResample" and module.mode == "downsample3d":
            kernel = module.time_conv.weight  # (C, C, 3, 1, 1): (previous, current pair), stride 2
            kernel.zero_()
            module.time_conv.bias.zero_()
            eye = torch.eye(kernel.shape[0], dtype=kernel.dtype)
            kernel[:, :, 1, 0, 0] = eye / 2
            kernel[:, :, 2, 0, 0] = eye / 2
            down += 1
    for module in vae.decoder.modules():
        if type(module).__name__ == "WanResample" and module.mode == "upsample3d":
            kernel = module.time_conv.weight  # (2C, C, 3, 1, 1): two frames' channels out of one
            kernel.zero_()
            module.time_conv.bias.zero_()
            eye = torch.eye(kernel.shape[1], dtype=kernel.dtype)
            kernel[:, :, -1, 0, 0] = torch.cat([eye, eye])
            up += 1
    if down != 2 or up != 2:
        raise ValueError(f"expected 2 temporal down- and 2 up-samplers (4x in time), found {down} and {up}")
