"""Z-Image (Tongyi-MAI/Z-Image-Turbo, Tongyi-MAI/Z-Image): a 6 B single-stream DiT ("S3-DiT") over 2x2 latent
patches, conditioned on Qwen3-4B's hidden states.

- The prompt goes through Qwen3's chat template as a user message with the generation prompt and
  ``enable_thinking=True`` (no empty think block), is padded to ``max_sequence_length`` (512) and encoded with
  the tokenizer's mask; the transformer gets the **second-to-last** hidden layer, and only the prompt's real
  tokens: one variable-length (L_i, 2560) tensor per prompt (``ZImagePipeline._encode_prompt``). Here the
  padded states and the mask are cached together (fixed length, so a batch stacks and a dropped caption takes
  the empty prompt's rows and mask) and cut to each prompt's real tokens only in ``denoise``.
- The transformer takes lists, one tensor per sample: latents (16, 1, h, w) with a frame axis, caption
  features (L_i, D). It pads and masks them itself, and patchifies 2x2 itself (no packing here).
- Its time runs the other way: it is handed ``(1000 - t) / 1000 = 1 - sigma`` (0 is pure noise), and it
  returns the *negative* velocity: the pipeline integrates ``-output``. ``denoise`` returns ``-output``, so the
  loss trains exactly the velocity ``noise - x0`` the scheduler steps with.
- Latents are Flux's VAE's (16 channels, shift 0.1159, scale 0.3611). The schedulers shift sigmas by a fixed
  amount (no dynamic shifting): Turbo's by 3, the base's by 6, as their configs say; a scheduler config asking for
  dynamic shifting is followed as the pipeline follows it (by the image's sequence length); ``model.flow_shift``
  overrides either.
- CFG is ZImagePipeline's own: on for any ``guidance_scale`` > 0, as ``pos + s * (pos - neg)`` (so s is one
  less than the usual scale: 0 is the conditional prediction alone). Turbo is distilled to sample with
  ``guidance_scale=0`` at 8 steps; the base model with CFG (e.g. 4) and a negative prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from models.base import DiffusionModule, lazy_class
from models.flux import dynamic_shift
from models.training_adapter import TrainingAdapterHooks

# Every block (the 30 main layers and the noise/context refiners) is the same ZImageTransformerBlock:
# attention (diffusers' Attention: to_q/to_k/to_v/to_out.0) and a SwiGLU feed-forward (w1, w3 in; w2 out).
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_FFN = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
# "all" adds the content projections outside the blocks: the patch embedder (64 -> dim), the caption embedder's
# linear (2560 -> dim) and the final layer's (dim -> 64), at the checkpoints' one patch size (2x2, one frame). The
# blocks' modulation linears stay out, as in musubi-tuner: their name (``adaLN_modulation.0``) is also the final
# layer's SiLU, which peft cannot wrap.
_PROJECTIONS = ("all_x_embedder.2-1", "cap_embedder.1", "all_final_layer.2-1.linear")


@dataclasses.dataclass
class ZImageOptions:
    max_sequence_length: int = 512  # Qwen3 tokens per templated prompt, ZImagePipeline's default
    # Turbo: a LoRA that de-distills it while training (ostris/zimage_turbo_training_adapter, v1 or v2 file), so the
    # run's LoRA learns the concept alone and samples on plain Turbo at 8 steps (models/training_adapter.py)
    training_adapter: str | None = None


def template(tokenizer, caption: str) -> str:
    """The caption as ZImagePipeline hands it to its tokenizer: Qwen3's chat template, one user message, the
    generation prompt, thinking on (Qwen3 writes no empty think block then)."""
    messages = [{"role": "user", "content": caption}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)


def caption_features(embeds: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Padded states (B, L, D) and their mask (B, L) -> the per-prompt real tokens [(L_i, D)], as the pipeline
    keeps them (``prompt_embeds[i][prompt_masks[i]]``)."""
    return [e[m].to(dtype) for e, m in zip(embeds, mask.bool(), strict=True)]


class ZImageModule(TrainingAdapterHooks, DiffusionModule):
    pipeline_class = lazy_class("diffusers.ZImagePipeline")
    denoiser_name = "transformer"
    denoiser_timestep_scale = 1.0  # the pipeline hands the transformer 1 - sigma (see denoiser_level)
    noise_schedule = "flow"
    pixel_multiple = 16  # the VAE's 8x, then the transformer's 2x2 patches
    license = "apache-2.0"
    Options = ZImageOptions
    components = {
        "transformer": "diffusers.ZImageTransformer2DModel",
        "vae": "diffusers.AutoencoderKL",
        "text_encoder": "transformers.Qwen3Model",
        "tokenizer": "transformers.Qwen2Tokenizer",  # Qwen2TokenizerFast in transformers 5
    }
    default_lora_targets = _ATTENTION
    fsdp_blocks = ("ZImageTransformerBlock",)
    lora_target_presets = {
        "attention": _ATTENTION,
        "attention+ffn": _ATTENTION + _FFN,  # musubi-tuner's linears (it leaves the two refiners' blocks out)
        "all": _ATTENTION + _FFN + _PROJECTIONS,  # nearer ai-toolkit's, which wraps every linear of the transformer
    }

    @classmethod
    def card_notes(cls, model_cfg) -> list[str]:
        options = model_cfg.get("options") or {}
        tokens, spec = options.get("max_sequence_length", 512), options.get("training_adapter")
        notes = [
            "ZImagePipeline's classifier-free guidance is on for any `guidance_scale` above 0 and computes "
            "`pos + guidance_scale * (pos - neg)`: Z-Image-Turbo samples with `guidance_scale=0.0` at 8 steps, the "
            f"Z-Image base with CFG (about 4) and a negative prompt. Sample with `max_sequence_length={tokens}`, "
            "the prompt length it was trained with."
        ]
        if spec is not None:
            notes.append(
                f"Trained with the training adapter `{spec}` active (it de-distills Z-Image-Turbo while training); the "
                "adapter is not part of these weights. Load them on plain Z-Image-Turbo and sample as Turbo: 8 steps, "
                "`guidance_scale=0.0`. The validation images were sampled that way, without the adapter."
            )
        return notes

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            [template(self.tokenizer, c) for c in captions],
            padding="max_length",
            max_length=self.options.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device).bool()  # (B, L): the templated prompt's real tokens
        out = self.text_encoder(
            input_ids=tokens.input_ids.to(self.device), attention_mask=mask, output_hidden_states=True
        )
        # (B, L, D) the second-to-last layer; the mask as a float, as the cache keeps every tensor
        return {"prompt_embeds": out.hidden_states[-2], "attention_mask": mask.float()}

    flow_shift_for = dynamic_shift  # by the image's sequence length, where the scheduler says so

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        dtype, scale = self.denoiser_dtype, self.noise.num_timesteps
        out = self.transformer(
            list(noisy.to(dtype).unsqueeze(2).unbind(0)),  # B x (16, 1, h, w): a one-frame video each
            (scale - timesteps) / scale,  # 1 - sigma, as ZImagePipeline passes it
            caption_features(cond["prompt_embeds"], cond["attention_mask"], dtype),  # B x (L_i, D)
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2)  # (B, 16, h, w): the velocity noise - x0 the pipeline integrates

    def denoiser_level(self, timestep: torch.Tensor) -> float:
        """The pipeline hands the transformer 1 - sigma: its noise level is one minus that."""
        return 1.0 - float(timestep.flatten()[0])

    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        """The pipeline's own loop (its CFG on the negative prompt when ``guidance_scale`` > 0) at the prompt
        length this run trains with; it returns unpacked latents, which the base class decodes."""
        return super().sample_image(
            pipe, prompt, autocast, max_sequence_length=self.options.max_sequence_length, **kwargs
        )

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        import diffusers
        from transformers import Qwen3Config, Qwen3Model

        from models import tiny

        torch.manual_seed(seed)
        transformer = diffusers.ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=32,
            n_layers=1,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=32,  # the text encoder's width
            axes_dims=[4, 6, 6],  # (frame, row, column) rotary dims summing to the head dim, as 32/48/48 of 128
            axes_lens=[1536, 512, 512],  # the real checkpoints' (diffusers' default has 1024 caption positions)
        )
        # Two layers, so the second-to-last hidden state the pipeline takes is a real intermediate layer.
        text_encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=272,  # the tiny tokenizer's 256 bytes and 9 special tokens
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=1024,
            )
        )
        return cls.pipeline_class(
            transformer=transformer,
            # Z-Image-Turbo's scheduler_config.json: a fixed shift of 3, no dynamic shifting
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
            ),
            vae=tiny.vae16(shift_factor=0.1159, scaling_factor=0.3611),  # Flux's VAE, shift and scale
            text_encoder=text_encoder,
            tokenizer=tiny.qwen_tokenizer(),
        )
