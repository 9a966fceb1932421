"""The tiny FLUX.2 pipelines (``python -m tuner.tiny flux2-klein|flux2-dev DIR``), in the real on-disk layout.

Their language models are as narrow as the other tiny text encoders (hidden 16) but as deep as the hidden
layers the pipelines stack by default (klein 9/18/27, dev 10/20/30): the layers are the pipelines' constants,
so the tiny models carry them rather than the pipelines being called with others. 16-wide layers cost little.

dev's real tokenizer folder holds a ``PixtralProcessor``; its image half needs torchvision, which the core
install lacks, and the pipeline only calls its ``apply_chat_template`` on text. The tiny one is the processor's
tokenizer alone (Mistral's control tokens, a chat template of the same format), which that call reads the same.
"""

from __future__ import annotations

import torch

from models import tiny

LATENT_CHANNELS = 8  # the real VAE's are 32; the transformer reads them 2x2-patchified (4x)
TEXT_WIDTH = 16
# Mistral Small 3.x's chat template, cut to what Flux2Pipeline sends (a system message, one user message, text
# content parts): <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}"
    "{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}{%- endfor %}"
)
MISTRAL_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "<pad>",
)


def mistral_tokenizer(model_max_length: int = 131072):
    """A Mistral (tekken-style) tokenizer built locally: byte-level BPE with no merges (every byte a token),
    then Mistral's control tokens, ``<pad>`` for padding and the chat template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(tiny._byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=model_max_length, additional_special_tokens=list(MISTRAL_SPECIAL_TOKENS[3:8]),
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def qwen3(layers: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=272, hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True,
    ))


def mistral3(layers: int, image_token: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(
        vocab_size=272, hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
    )
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=image_token)
    return Mistral3ForConditionalGeneration(config)


def vae():
    """A tiny AutoencoderKLFlux2 whose batch-norm statistics are not the identity (as no real one's are), so a
    wrong normalisation shows."""
    from diffusers import AutoencoderKLFlux2

    model = AutoencoderKLFlux2(**{**tiny.VAE, "latent_channels": LATENT_CHANNELS})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(4 * LATENT_CHANNELS, generator=generator) * 0.1)
        model.bn.running_var.copy_(torch.rand(4 * LATENT_CHANNELS, generator=generator) + 0.5)
    return model


def tiny_flux2(dev: bool, seed: int = 0):
    """Flux2Pipeline (``dev``) or Flux2KleinPipeline (a base checkpoint, ``is_distilled=False``)."""
    import diffusers

    from models.flux import DEV_SCHEDULER

    torch.manual_seed(seed)
    transformer = diffusers.Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_WIDTH,  # three stacked hidden layers
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),  # (t, h, w, l), summing to the head dim
        guidance_embeds=dev,
    )
    # FLUX.2's scheduler config is FLUX.1 [dev]'s (dynamic shifting; the pipelines pass their own mu)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    common = dict(transformer=transformer, vae=vae(), scheduler=scheduler)
    if dev:
        tokenizer = mistral_tokenizer()
        encoder = mistral3(30, tokenizer.convert_tokens_to_ids("[IMG]"))
        return diffusers.Flux2Pipeline(text_encoder=encoder, tokenizer=tokenizer, **common)
    tokenizer = tiny.qwen_tokenizer()
    return diffusers.Flux2KleinPipeline(text_encoder=qwen3(27), tokenizer=tokenizer, is_distilled=False, **common)
