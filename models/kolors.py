"""Kolors: SDXL's UNet and micro-conditioning with a ChatGLM3 text encoder (diffusers' own ``ChatGLMModel``).

The prompt is ChatGLM's penultimate hidden states (256 tokens, with the tokenizer's attention mask and
position ids, as ``KolorsPipeline`` encodes them) and the pooled vector is the last layer's final token;
the UNet projects the 4096-wide states to its cross-attention width itself (``encoder_hid_proj``). Time ids,
the denoiser call and the fp32 VAE are SDXL's (the class below subclasses it). The schedule has 1100 train
timesteps, which the noise schedule reads from the checkpoint. Needs ``sentencepiece`` (``.[kolors]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.base import lazy_class
from models.sdxl import SDXLModule, tiny_unet

_SENTENCES = [
    "a red circle on white",
    "a blue square on white",
    "a green triangle on black",
    "a photo of a dog in the park",
    "a yellow star over the sea at night",
    "the quick brown fox jumps over the lazy dog",
]


class KolorsModule(SDXLModule):
    pipeline_class = lazy_class("diffusers.KolorsPipeline")
    license = "other"  # the Kolors licence (research use; commercial use by registration)
    kohya_base_versions = {"kolors": "kolors"}
    text_encoder_lora_targets = {"text_encoder": ("query_key_value", "dense")}  # ChatGLM's attention
    requires = {"sentencepiece": "kolors"}
    components = {
        "unet": "diffusers.UNet2DConditionModel",
        "vae": "diffusers.AutoencoderKL",
        "text_encoder": "diffusers.pipelines.kolors.ChatGLMModel",
        "tokenizer": "diffusers.pipelines.kolors.ChatGLMTokenizer",
    }
    fsdp_blocks = ("BasicTransformerBlock", "ResnetBlock2D")  # SDXL's UNet: trainer=fsdp shards by these

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            list(captions), padding="max_length", max_length=256, truncation=True, return_tensors="pt"
        ).to(self.device)
        out = self.text_encoder(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            position_ids=tokens["position_ids"],
            output_hidden_states=True,
        )
        # ChatGLM's hidden states are sequence-first: (L, B, D).
        prompt_embeds = out.hidden_states[-2].permute(1, 0, 2).clone()  # (B, 256, D)
        pooled = out.hidden_states[-1][-1, :, :].clone()  # (B, D): the last token of the last layer
        return {"prompt_embeds": prompt_embeds, "pooled": pooled}

    def pipeline_components(self):
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "unet": self.unet}

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        import diffusers
        from diffusers.pipelines.kolors import ChatGLMModel
        from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

        from models import tiny

        torch.manual_seed(seed)
        vae = diffusers.AutoencoderKL(**tiny.VAE)
        # SDXL's, with ChatGLM's width (32 here, 4096 real) projected to cross-attention's by the UNet.
        unet = tiny_unet(cross_attention_dim=32, encoder_hid_dim_type="text_proj", encoder_hid_dim=32)
        tokenizer = _tokenizer()
        config = ChatGLMConfig(
            num_layers=2,
            padded_vocab_size=len(tokenizer),
            hidden_size=32,
            ffn_hidden_size=64,
            kv_channels=8,
            num_attention_heads=4,
            seq_length=256,
            multi_query_attention=True,
            multi_query_group_num=2,
            original_rope=True,
            torch_dtype="float32",
        )
        text_encoder = ChatGLMModel(config, empty_init=False)
        # Its init leaves some weights (the RMSNorms') as uninitialised memory: set every one explicitly.
        for name_, param in text_encoder.named_parameters():
            torch.nn.init.ones_(param) if "layernorm" in name_ or "norm" in name_ else torch.nn.init.normal_(param, std=0.02)
        scheduler = diffusers.EulerDiscreteScheduler(
            num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear"
        )
        return cls.pipeline_class(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )


def _tokenizer():
    """ChatGLM's tokenizer over a SentencePiece model trained here on a few sentences (byte fallback on,
    so any text encodes), written to a temporary file the tokenizer reads and later saves beside the model."""
    import atexit
    import io
    import shutil
    import tempfile
    from pathlib import Path

    import sentencepiece as spm
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES * 10),
        model_writer=model,
        vocab_size=300,  # above the 256 byte pieces
        byte_fallback=True,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    folder = tempfile.mkdtemp(prefix="tuner-kolors-")
    atexit.register(shutil.rmtree, folder, True)  # read again when the pipeline is saved, so kept until exit
    path = Path(folder) / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return ChatGLMTokenizer(vocab_file=str(path))
