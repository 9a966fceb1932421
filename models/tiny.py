"""Tiny random-weight pipelines in the exact on-disk layout of the real checkpoints.

The layout (model_index.json, unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/) is what
``from_pretrained`` reads for ``runwayml/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-2-1``
and ``stabilityai/stable-diffusion-xl-base-1.0``. Only the sizes differ, so tests exercise the very
loading path a real run takes. Tokenizers are built locally: there is no Hub access in tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

FAMILIES = ("sd15", "sd2", "sdxl")

# Small enough to train a step in tens of milliseconds on a CPU, but with the real block types,
# an 8x VAE (four blocks) and a UNet that downsamples once, so latents must be even.
_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (GPT-2, CLIP) uses for raw bytes.

    Printable Latin-1 bytes stand for themselves; the rest are shifted past U+0100.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, shift = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + shift))
            shift += 1
    return out


def _clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with no merges: every byte is a token."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _clip_text_config():
    from transformers import CLIPTextConfig

    # Three layers, so SDXL's penultimate hidden state is a real intermediate layer.
    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu",
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )


# Shared by every family's UNet: two blocks, so 8x8 latents (64 px images) downsample once.
_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=32
)


def _unet_sd(cross_attention_dim: int, linear_proj: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        **_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4) if linear_proj else 8,
        use_linear_projection=linear_proj,
    )


def _unet_sdxl():
    from diffusers import UNet2DConditionModel

    # Pooled text embeds (32) + six time ids of 8 each, as SDXL's add_embedding expects.
    return UNet2DConditionModel(
        **_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
    )


def _scheduler_kwargs():
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )


def build_pipeline(family: str, seed: int = 0):
    """Return a tiny random pipeline object of ``family``'s real pipeline class."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**_VAE)
    if family == "sdxl":
        unet = _unet_sdxl()
        scheduler = diffusers.EulerDiscreteScheduler(**_scheduler_kwargs(), timestep_spacing="leading")
        return diffusers.StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(_clip_text_config()),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config()),
            tokenizer=_clip_tokenizer(),
            tokenizer_2=_clip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
        )
    if family == "sd2":
        # SD 2.x (768-v) predicts velocity; the scheduler config carries it, as on the Hub.
        unet = _unet_sd(cross_attention_dim=32, linear_proj=True)
        scheduler = diffusers.DDIMScheduler(
            **_scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"
        )
    else:
        unet = _unet_sd(cross_attention_dim=32, linear_proj=False)
        scheduler = diffusers.PNDMScheduler(**_scheduler_kwargs(), skip_prk_steps=True)
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_clip_text_config()),
        tokenizer=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_pipeline(family: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny ``family`` pipeline to ``path`` atomically (a temp dir, then a rename)."""
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        build_pipeline(family, seed).save_pretrained(tmp, safe_serialization=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first; theirs is as good as ours
            if not (path / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
