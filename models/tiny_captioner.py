"""A tiny random image-to-text captioner for the tests of ``python -m tuner.caption``: a real
``LlavaForConditionalGeneration`` (a one-layer CLIP vision tower and a one-layer Llama) with its
``LlavaProcessor`` (CLIP image processor, a Llama 3 tokenizer built locally, a chat template), saved with
``save_pretrained`` so that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load it as they would a
Hub checkpoint. Its captions are gibberish: it exercises the loading, templating and generation path only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|finetune_right_pad_id|>"  # one of Llama 3's own special tokens, as Llama 3.x based VLMs pad
IMAGE_SIZE, PATCH_SIZE = 32, 8  # 16 image tokens per image

# A Llama 3 style chat template that takes structured content (an image and a text part), as VLM
# processors' templates do.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{ '<image>' }}{%- elif part['type'] == 'text' %}{{ part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{ '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def captioner_tokenizer():
    """``models.tiny.llama3_tokenizer`` with an image token and a padding token."""
    from models.tiny import llama3_tokenizer

    tokenizer = llama3_tokenizer(model_max_length=2048)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN], "pad_token": PAD_TOKEN})
    return tokenizer


def captioner_processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",  # CLIP's class token dropped, as in LLaVA-1.5
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def captioner_model(tokenizer, seed: int = 0):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def write_captioner(path: str | Path, seed: int = 0) -> Path:
    """The tiny captioner at ``path`` (kept if already there), written to a temporary folder beside it
    and renamed into place, so that a concurrent reader never sees half of it."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-captioner-", dir=path.parent))
    try:
        tokenizer = captioner_tokenizer()
        captioner_model(tokenizer, seed).save_pretrained(tmp)
        captioner_processor(tokenizer).save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first, or path is an existing (empty) folder
            if (path / "config.json").exists():
                return path
            path.mkdir(exist_ok=True)
            for item in tmp.iterdir():
                os.replace(item, path / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
