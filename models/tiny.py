"""Parts for tiny random-weight pipelines, and writing them in the exact on-disk layout of the real ones.

Each family builds its own tiny pipeline (``DiffusionModule.tiny_pipeline``) from these parts; the
layout it saves (model_index.json, unet/ or transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/)
is what ``from_pretrained`` reads for the real checkpoint. Only the sizes differ, so tests exercise the
very loading path a real run takes. Tokenizers are built locally: there is no Hub access in tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Small enough to train a step in tens of milliseconds on a CPU, but with the real block types,
# an 8x VAE (four blocks) and a UNet that downsamples once, so latents must be even.
VAE = dict(
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


def vae16(shift_factor: float, scaling_factor: float):
    """A tiny 16-channel VAE with the given shift and scale and no quant convs, as SD3's and Flux's."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        **{**VAE, "latent_channels": 16},
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
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


def clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with no merges: every byte is a token."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def clip_text_config():
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
UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=32
)


def sd_unet(cross_attention_dim: int, linear_proj: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        **UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4) if linear_proj else 8,
        use_linear_projection=linear_proj,
    )


SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def write_pipeline(
    build: Callable[[], Any], path: str | os.PathLike, extra_files: Callable[[], dict[str, str]] | None = None
) -> Path:
    """Write the pipeline ``build()`` returns to ``path`` atomically (a temp dir, then a rename), with the text
    files ``extra_files()`` names (asked for after the build) beside it; a path that already holds one is
    left as it is."""
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        build().save_pretrained(tmp, safe_serialization=True)
        for name, text in (extra_files() if extra_files else {}).items():
            (tmp / name).write_text(text)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first; theirs is as good as ours
            if not (path / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def t5_tokenizer(model_max_length: int = 256):
    """A T5 tokenizer built locally: a Unigram vocabulary of single characters (each also with the
    SentencePiece word marker ``▁``) wrapped in ``T5TokenizerFast``, so no sentencepiece model is needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord(" ") + 1, ord("~") + 1)]
    pieces = ["<pad>", "</s>", "<unk>", "▁"] + chars + ["▁" + c for c in chars]
    vocab = [(p, 0.0 if i < 3 else -1.0 - (i > len(chars) + 3)) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


def t5_config(d_model: int = 64):
    from transformers import T5Config

    return T5Config(
        vocab_size=256, d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=4, relative_attention_num_buckets=8
    )


# Qwen3's chat template, cut to what the pipelines use (one user message, the generation prompt, and the
# empty thinking block Qwen3 writes when thinking is off), so Z-Image and FLUX.2 [klein] template prompts
# exactly as they do with the real tokenizer.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<think>", "</think>",
)


def qwen_tokenizer(model_max_length: int = 32768):
    """A Qwen2/2.5/3 tokenizer built locally: byte-level BPE with no merges (every byte a token, ids 0-255),
    then Qwen's special tokens (ids 256 on), padding with ``<|endoftext|>`` and Qwen3's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


# Llama 3's special tokens, in their order (ids 128000 on in the real vocabulary; 256 on here).
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
)


def llama3_tokenizer(model_max_length: int = 131072):
    """A Llama 3.1 (Instruct) tokenizer built locally: byte-level BPE with no merges (every byte a token, ids
    0-255), then Llama 3's special tokens; every encoding starts with ``<|begin_of_text|>`` and none ends with
    an end token, ``<|eot_id|>`` is the end-of-sequence token and there is no padding token, as in Meta's
    ``PreTrainedTokenizerFast`` (HiDream's pipeline pads with the end token itself)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    bos = len(vocab)  # <|begin_of_text|>, the first special token
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(LLAMA3_SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        model_max_length=model_max_length,
    )
