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

from models.learnable_vae import learnable_vae, set_factors, toy_images  # noqa: F401 - toy_images re-exported


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
# The decoder-only language models newer pipelines use as text encoders (Qwen3: Z-Image, FLUX.2 [klein];
# Qwen2.5-VL: Qwen-Image; Llama 3.1: HiDream; Mistral 3: FLUX.2 [dev]) are random tiny models of the same
# make as ChatGLM, with the same two faults (0.02-std embeddings and value/output projections, so a token's
# state is mostly its own word), and get the same cure: unit-scale token embeddings and attention
# projections (q/k/v/o_proj) redrawn at 1/sqrt(fan-in). The last templated token's state (second-to-last layer)
# then differs between class prompts twice as much or more (RMS 0.04 -> 0.09 for Qwen3, 0.04 -> 0.13 for Llama;
# tests/test_learnable.py). Their vision towers, unused by a text prompt, are left.
DECODER_LMS = (
    "Qwen3Model", "Qwen3ForCausalLM", "Qwen2_5_VLForConditionalGeneration", "LlamaForCausalLM",
    "Mistral3ForConditionalGeneration",
)
DECODER_LM_TOKEN_SCALE = 40.0
# FLUX.2 [dev] puts a ~180-token system message before the prompt. At the scale above each later token averages
# over all of it, so the caption reached the tokens after it ~15x weaker than klein's (Qwen3, no system message):
# mean |difference| between two class prompts 0.036 against 0.7, and the dev fine-tune ignored its prompt (0.25).
# Queries and keys at twice that scale (logits x4) carry it (0.57): dev's full fine-tune 0.25 -> 1.00.
SHARPER_ATTENTION = {"Mistral3ForConditionalGeneration": 2.0}


def _sharpen_decoder_lm(module, generator: torch.Generator) -> None:
    module.get_input_embeddings().weight.mul_(DECODER_LM_TOKEN_SCALE)
    for name, attention in module.named_modules():
        if "vision" in name or "visual" in name or not hasattr(attention, "o_proj"):
            continue
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
            weight = linear.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * weight.shape[1] ** -0.5)


def sharpen_text_encoders(pipe, seed: int = 0) -> None:
    """Make the tiny CLIP, ChatGLM and decoder-only LM text encoders tell prompts apart (T5 already does:
    ~0.9 apart)."""
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
            elif kind in DECODER_LMS:
                _sharpen_decoder_lm(module, torch.Generator().manual_seed(seed))
                for path, attention in module.named_modules():  # FLUX.2 [dev]'s long system message (above)
                    if kind in SHARPER_ATTENTION and hasattr(attention, "o_proj") and "vision" not in path:
                        attention.q_proj.weight.mul_(SHARPER_ATTENTION[kind])
                        attention.k_proj.weight.mul_(SHARPER_ATTENTION[kind])


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


def reshape_transformer(pipe, seed: int = 0, name: str = "transformer") -> dict[str, float]:
    """Make a transformer denoiser able to learn a spatial task, as a real one can: at least
    ``WIDTH_OVER_PATCH`` times as wide as its patch (more heads of the same width, so Flux's rotary axes
    stay; the widths its config repeats, SD3's caption projection and PixArt's cross-attention, follow) and,
    where it has a sin-cos position code, one whose tokens differ (``POSITION_SPACING``). PixArt computes
    its code from the config (``interpolation_scale``); SD3 stores its code with its weights, so the sharper
    one is written there. ``name``: the pipeline's component (``transformer_2``: Wan 2.2 A14B's second expert).
    Returns what was changed."""
    denoiser = getattr(pipe, name, None)
    if denoiser is not None and {"dim", "n_heads", "all_patch_size"} <= set(denoiser.config):
        return _widen_z_image(pipe, denoiser, seed)
    if denoiser is None or "num_attention_heads" not in denoiser.config:
        return {}
    config = _editable(denoiser.config)
    changed: dict[str, float] = {}
    width = config["num_attention_heads"] * config["attention_head_dim"]
    patch_size = config.get("patch_size", 1)
    if isinstance(patch_size, (list, tuple)):  # Wan: (frames, rows, columns), one frame a token
        patch_size = patch_size[-1]
    patch = config["in_channels"] * patch_size**2
    if hasattr(denoiser, "img_in"):  # Qwen-Image: in_channels is already the packed 2x2 token (patch_size names it)
        patch = config["in_channels"]
    wanted = max(WIDTH_OVER_PATCH * patch, MIN_WIDTH)
    if width < wanted:
        heads = -(-wanted // config["attention_head_dim"])
        config["num_attention_heads"] = heads
        for key in ("caption_projection_dim", "cross_attention_dim"):
            if config.get(key) == width:
                config[key] = heads * config["attention_head_dim"]
        width = heads * config["attention_head_dim"]
        changed["transformer_width"] = width
    tokens = config.get("sample_size", 0) // patch_size  # the code's base size
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
        pipe.register_modules(**{name: new})
    return changed


def _widen_z_image(pipe, denoiser, seed: int) -> dict[str, float]:
    """``reshape_transformer`` for Z-Image's transformer, whose config names its width ``dim`` and its heads
    ``n_heads`` (and ``n_kv_heads``), its patch ``all_patch_size`` x ``all_f_patch_size``; its positions are
    rotary, so only the width changes (more heads of the same width: the rotary axes stay)."""
    config = _editable(denoiser.config)
    head = config["dim"] // config["n_heads"]
    patch = config["in_channels"] * config["all_patch_size"][0] ** 2 * config["all_f_patch_size"][0]
    wanted = max(WIDTH_OVER_PATCH * patch, MIN_WIDTH)
    if config["dim"] >= wanted:
        return {}
    heads = -(-wanted // head)
    config.update(dim=heads * head, n_heads=heads, n_kv_heads=heads)
    torch.manual_seed(seed)
    pipe.register_modules(transformer=type(denoiser).from_config(config))
    return {"transformer_width": heads * head}


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
    if getattr(pipe, "transformer_2", None) is not None:  # a second expert (Wan 2.2 A14B): shaped alike, its own draw
        reshape_transformer(pipe, seed + 1, name="transformer_2")
    old = getattr(pipe, "vae", None)
    if old is None:
        levels = deepen_unet(pipe, PIXEL_SIZE, seed)
        return {**reshaped, **({"unet_levels": levels} if levels else {})}
    if type(old).__name__ == "AutoencoderKLQwenImage":  # a causal 3-D VAE, normalised per channel
        from models.learnable_vae_qwen import make_qwen_vae

        vae, measured = make_qwen_vae(seed)
        pipe.register_modules(vae=vae)
        return {**measured, **reshaped}
    if type(old).__name__ == "AutoencoderKLWan":  # Wan 2.1: the Qwen-Image one's weights (the same VAE)
        from models.learnable_vae_wan import make_wan_vae

        vae, measured = make_wan_vae(old.config, seed)
        pipe.register_modules(vae=vae)
        return {**measured, **reshaped}
    if type(old).__name__ == "AutoencoderKLLTXVideo":  # LTX-Video: per-channel buffers, 8x space and time here
        from models.learnable_vae_ltx import make_ltx_vae

        vae, measured = make_ltx_vae(seed)
        pipe.register_modules(vae=vae)
        return {**measured, **reshaped}
    if type(old).__name__ == "AutoencoderKLFlux2":  # FLUX.2: batch-norm statistics over 2x2 patches, no factors
        from models.learnable_vae_flux2 import make_flux2_vae

        vae, measured = make_flux2_vae(old.config, seed)
        pipe.register_modules(vae=vae)
        return {**measured, **reshaped}
    config = old.config
    vae = learnable_vae(config.latent_channels, config.shift_factor is not None, bool(config.use_quant_conv), seed)
    measured = set_factors(vae, toy_images(64, 64, torch.Generator().manual_seed(seed)))
    pipe.register_modules(vae=vae)
    return {**measured, **reshaped}
