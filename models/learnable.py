"""Tiny pipelines whose frozen parts behave like real ones, so that a family can be shown to learn
(``python -m tuner.tiny FAMILY DIR --learnable``; ``bench/learn.py``).

A tiny *random* VAE is useless for that: its posterior std is about 1 while its means spread by about
0.2, so a cached latent is nearly pure noise, and its decoder returns noise whatever it is given. Fitting
one for a few hundred steps on a CPU gave a decoder that lost the colours and bent the shapes. So the
learnable VAE is set **by construction**, still an ``AutoencoderKL`` of the tiny size (16 channels a block,
two norm groups), in the family's own latent width:

- the encoder is an 8x8 box filter of the image's RGB, rotated into the latent channels by a fixed
  orthonormal map: every residual branch and the attention's output are zero (so each block passes its
  input on), each down-sampler averages 2x2, and the one norm that cannot be bypassed (``conv_norm_out``)
  sees each signal beside its negative and a large constant, which fixes its mean at 0 and its std at
  ``CONST / 2`` to within 0.2%, so its affine undoes it, and a large bias keeps the SiLU after it in its
  linear range;
- the posterior is nearly deterministic: the log-variance half of ``conv_out`` is the constant ``LOGVAR``
  (std ~1e-3), against latents of unit spread;
- ``scaling_factor`` (and ``shift_factor`` where the family's VAE has one; else the centring is folded into
  the quant convs) give the latents zero mean and unit variance on images, as the real factors are chosen;
- the decoder inverts it: the latents back to RGB, up-sampled (nearest) to 8x8 blocks.

Random tiny CLIPs and ChatGLMs barely tell prompts apart (``sharpen_text_encoders``); T5 does. The denoiser stays
random, but shaped so that it can learn where things are, as a real one can: a transformer is widened and
given a position code whose tokens differ (``reshape_transformer``); a pixel-space UNet (IF) goes down to a
grid coarse enough for its convolutions to see the image's edges (``deepen_unet``). Pixel-space families
have no VAE.
"""

from __future__ import annotations

import math

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


def prompt_spread(pipe, prompts: list[str]) -> float:
    """The smallest distance between two prompts' embeddings (of the first text encoder, mean over
    tokens, over the embeddings' overall scale): how clearly a text encoder tells them apart."""
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    tokens = tokenizer(prompts, padding="max_length", max_length=min(tokenizer.model_max_length, 64),
                       truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(tokens.input_ids)[0].float()
    flat = hidden.flatten(1)
    scale = flat.norm(dim=1).mean()
    gaps = [float((flat[i] - flat[j]).norm() / scale) for i in range(len(prompts)) for j in range(i)]
    return min(gaps) if gaps else math.inf


# A random CLIP's outputs are dominated by its position embeddings (its token embeddings start as small as
# they are): "a square at the top left" and "... top right" came out 7-16% apart. Real token embeddings
# carry the words; scaled up, they bring two such prompts about 30% apart.
CLIP_TOKEN_SCALE = 20.0


# A random tiny ChatGLM (Kolors) fails twice over. Its 0.02-std weights leave every hidden state at the
# embedding's 0.02 scale, and its attention adds almost nothing to the residual, so each token stays its own
# word: the pooled vector (the last token, "square" in every toy prompt) was the same for every class (0.3%
# apart), and the words that differ are 18 of the 256 left-padded tokens. A real language model's late tokens
# summarise the sentence before them. Token embeddings of unit scale and attention weights of the standard
# 1/sqrt(fan-in) scale give that: the pooled vectors come ~25% apart. Before this, a full fine-tune of Kolors
# ignored its prompt (0.25, chance), and with the embeddings alone scaled it told left from right only.
CHATGLM_TOKEN_SCALE = 40.0


def sharpen_text_encoders(pipe, seed: int = 0) -> None:
    """Make the tiny CLIP and ChatGLM text encoders tell prompts apart (T5 already does: ~0.9 apart)."""
    for name, module in pipe.components.items():
        if not name.startswith("text_encoder"):
            continue
        kind = type(module).__name__
        with torch.no_grad():
            if kind.startswith("CLIPTextModel"):
                module.get_input_embeddings().weight.mul_(CLIP_TOKEN_SCALE)
            elif kind == "ChatGLMModel":
                module.get_input_embeddings().weight.mul_(CHATGLM_TOKEN_SCALE)
                generator = torch.Generator().manual_seed(seed)
                for layer in module.encoder.layers:
                    for linear in (layer.self_attention.query_key_value, layer.self_attention.dense):
                        weight = linear.weight
                        weight.copy_(torch.randn(weight.shape, generator=generator) * weight.shape[1] ** -0.5)


# How much wider than the patch it reads a learnable transformer is made. Flow matching (and epsilon
# prediction at high noise) returns the noise through the denoiser, and every token passes a LayerNorm that
# throws away its scale: with no spare dimensions the noise cannot come back whole. SD3's tiny transformer at
# 1x its patch stalled at a loss of ~42 (a pure-noise probe, sum over a sample) where 2x reached ~8 (the
# floor without the text is ~6).
WIDTH_OVER_PATCH = 2
# ... and at least this wide: PixArt's (16 numbers a token) learned nothing at 32 (0.31 after 3000 steps)
MIN_WIDTH = 64
PIXEL_SIZE = 64  # the image size a pixel-space family's learnable UNet is shaped for (IF stage I's own)
# Distance between neighbouring tokens in the sin-cos position code. A tiny width keeps only a few of the
# code's frequencies, and at the config's spacing (1/8 of a unit for SD3's tiny one) every token got nearly
# the same code (spread 0.01 against values of 0.6): no position could be told apart, so a square could not
# be put in a quadrant (the probe stayed at the text-blind floor); at a spacing of 10 it was, in ~250 steps.
POSITION_SPACING = 10.0


def _editable(config) -> dict:
    """A model's config to change and build from: without diffusers' list of the keys left at their
    defaults, which ``from_config`` would reset (PixArt's ``interpolation_scale`` silently stayed None)."""
    return {k: v for k, v in config.items() if k != "_use_default_values"}


def reshape_transformer(pipe, seed: int = 0) -> dict[str, float]:
    """Make a transformer denoiser able to learn a spatial task, as a real one can: at least
    ``WIDTH_OVER_PATCH`` times as wide as its patch (more heads of the same width, so Flux's rotary axes
    stay; the widths its config repeats, SD3's caption projection and PixArt's cross-attention, follow) and,
    where it has a sin-cos position code, one whose tokens differ (``POSITION_SPACING``). PixArt computes
    its code from the config (``interpolation_scale``); SD3 stores its code with its weights, so the sharper
    one is written there. Returns what was changed."""
    denoiser = getattr(pipe, "transformer", None)
    if denoiser is None or "num_attention_heads" not in denoiser.config:
        return {}
    config = _editable(denoiser.config)
    changed: dict[str, float] = {}
    width = config["num_attention_heads"] * config["attention_head_dim"]
    patch = config["in_channels"] * config.get("patch_size", 1) ** 2
    wanted = max(WIDTH_OVER_PATCH * patch, MIN_WIDTH)
    if width < wanted:
        heads = -(-wanted // config["attention_head_dim"])
        config["num_attention_heads"] = heads
        for key in ("caption_projection_dim", "cross_attention_dim"):
            if config.get(key) == width:
                config[key] = heads * config["attention_head_dim"]
        width = heads * config["attention_head_dim"]
        changed["transformer_width"] = width
    tokens = config.get("sample_size", 0) // config.get("patch_size", 1)  # the code's base size
    if "interpolation_scale" in config:  # PixArt: position = index / (grid / base) / interpolation_scale
        config["interpolation_scale"] = 1.0 / POSITION_SPACING
        changed["position_spacing"] = POSITION_SPACING
    torch.manual_seed(seed)
    new = type(denoiser).from_config(config)
    embed = getattr(new, "pos_embed", None)
    if config.get("pos_embed_max_size") and getattr(embed, "pos_embed", None) is not None:  # SD3: stored
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        grid = config["pos_embed_max_size"]
        code = get_2d_sincos_pos_embed(width, grid, base_size=tokens, output_type="pt",
                                       interpolation_scale=tokens / grid / POSITION_SPACING)
        with torch.no_grad():
            embed.pos_embed.copy_(code.float().unsqueeze(0))
        changed["position_spacing"] = POSITION_SPACING
    if changed:
        pipe.register_modules(transformer=new)
    return changed


# The coarsest grid a pixel-space UNet reaches, at most. A 3x3 convolution knows where it is only from the
# padding it reaches: IF's tiny UNet stops at 16x16 on 64x64 images, where a cell inside a quadrant sees
# no edge, so it could not put a square in the quadrant its prompt named (its samples followed the seed:
# 0.25, the text changed its output by 0.1%). Real IF UNets go down to 8x8.
COARSEST = 4


def deepen_unet(pipe, size: int, seed: int = 0) -> int | None:
    """Give a pixel-space UNet more down (and up) blocks, of its first block's kind and width, until its
    coarsest grid at ``size`` pixels is at most ``COARSEST``; returns the new number of levels, or None
    where it already was."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return None
    config = _editable(unet.config)
    down, up, widths = list(config["down_block_types"]), list(config["up_block_types"]), list(config["block_out_channels"])
    if size // 2 ** (len(down) - 1) <= COARSEST:
        return None
    while size // 2 ** (len(down) - 1) > COARSEST:
        down.insert(0, down[0])
        up.append(up[-1])
        widths.insert(0, widths[0])
    config.update(down_block_types=down, up_block_types=up, block_out_channels=widths)
    torch.manual_seed(seed)
    pipe.register_modules(unet=type(unet).from_config(config))
    return len(down)


def make_learnable(pipe, seed: int = 0) -> dict[str, float]:
    """Swap in a learnable VAE of the same latent width and layout (if the pipeline has a VAE), reshape a
    transformer denoiser (``reshape_transformer``) and sharpen the text encoders, in place; returns what
    was measured and changed."""
    sharpen_text_encoders(pipe, seed)
    reshaped = reshape_transformer(pipe, seed)
    old = getattr(pipe, "vae", None)
    if old is None:
        levels = deepen_unet(pipe, PIXEL_SIZE, seed)
        return {**reshaped, **({"unet_levels": levels} if levels else {})}
    config = old.config
    vae = learnable_vae(config.latent_channels, config.shift_factor is not None, bool(config.use_quant_conv), seed)
    measured = set_factors(vae, toy_images(64, 64, torch.Generator().manual_seed(seed)))
    pipe.register_modules(vae=vae)
    return {**measured, **reshaped}
