"""HiDream-I1 (HiDream-ai/HiDream-I1-Full, -Dev, -Fast): a 17 B rectified-flow transformer whose feed-forwards
are a sparse mixture of experts, conditioned on four text encoders.

- Text, as ``HiDreamImagePipeline.encode_prompt`` builds it: CLIP-L's and CLIP-G's *pooled* projections only,
  concatenated (each over ``min(max_sequence_length, 218)`` padded tokens, run without a mask); T5-XXL's hidden
  states (run with its mask); and Llama 3.1 8B Instruct's hidden states from **every** layer (the embeddings
  left out; run with its mask, the prompt as it is, no chat template, padded with Llama's end token), stacked.
  The transformer's ``llama_layers`` picks which layer feeds which of its 48 blocks. The cache holds every
  layer, batch first (B, layers, L, D): at real size 32 x 128 x 4096 in bf16, 32 MiB a caption (T5's is 1 MiB).
  No text mask reaches the transformer: it attends to the padding's states, as it does when sampling.
- Llama is not in HiDream's own repositories: where the checkpoint's ``model_index.json`` names none, it (and its
  tokenizer) loads from ``model.options.llama_path``, and a full export leaves it out again, as upstream does.
- Latents are Flux's (16 channels, shifted and scaled); the transformer cuts its own 2x2 patches, padding a
  non-square image's to ``max_resolution``'s sequence (4096 tokens: ~1 megapixel at most) with a mask, as the
  pipeline lets it. In train mode it returns patches (B, C, S, 4), which are put back into the image here.
- Timestep: sigma x 1000, as the pipeline passes the scheduler's. Sign: the pipeline integrates the *negated*
  output, so the velocity noise - x0 trained is ``-output``.
- Shift: Full's scheduler is UniPC over flow sigmas (``flow_shift`` 3.0), Dev's and Fast's FlowMatchLCM
  (``shift`` 6.0 / 3.0); no dynamic shift. ``model.flow_shift`` overrides it.
- The routers (``MoEGate``) compute DeepSeek-MoE's load-balancing loss in train mode, which diffusers (like the
  reference code) drops. ``model.options.aux_loss_weight`` (alpha, 0 = off as in SimpleTuner) adds
  alpha x the sum over MoE layers of sum_i P_i f_i to the loss (0.01 is the gates' own alpha); the mean per
  layer (1.0 when balanced) is logged as ``train/moe_balance``.
- Sampling: the pipeline rescales every request to its default area (1024 x 1024); validation keeps the asked
  size. Full samples with real CFG (negative prompt); Dev and Fast are guidance-distilled (guidance 0).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from models.base import DiffusionModule, lazy_class
from models.encoders import t5_with_mask
from models.trainable import load_kwargs

# HiDream's attention has an image stream (to_q ... to_out) and, in its double-stream blocks, a text stream
# (to_q_t ... to_out_t); to_out is a plain Linear (no ".0"). The feed-forwards are SwiGLUs (w1, w2, w3): the
# routed experts, the shared expert and the text stream's. The router (MoEGate) is a bare weight: never a target.
_ATTENTION = ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t")
_FFN = ("w1", "w2", "w3")
_MODULATION = ("adaLN_modulation.1",)
_LLAMA = ("text_encoder_4", "tokenizer_4")
CLIP_MAX = 218  # the pipeline's cap on CLIP's tokens


@dataclasses.dataclass
class HiDreamOptions:
    max_sequence_length: int = 128  # tokens per prompt for T5 and Llama (CLIPs: up to 218), the pipeline's default
    # alpha of the routers' load-balancing loss (DeepSeek-MoE's, the gates' own alpha is 0.01); 0: off
    aux_loss_weight: float = 0.0
    # where Llama 3.1 8B Instruct (text_encoder_4, tokenizer_4) loads from when the checkpoint has none (HiDream's
    # own repos leave it out; the tiny pipeline and this tuner's pipeline/ exports hold it)
    llama_path: str = "meta-llama/Llama-3.1-8B-Instruct"


def unpatchify(patches: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The transformer's train-mode output (B, C, S, 4), S >= h/2 * w/2 (padded), -> (B, C, h, w)."""
    b, c = patches.shape[:2]
    grid = patches[:, :, : (h // 2) * (w // 2)].reshape(b, c, h // 2, w // 2, 2, 2)
    return grid.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


class HiDreamModule(DiffusionModule):
    pipeline_class = lazy_class("diffusers.HiDreamImagePipeline")
    denoiser_name = "transformer"
    noise_schedule = "flow"
    pixel_multiple = 16  # the VAE's 8x, then 2x2 patches
    license = "mit"
    Options = HiDreamOptions
    components = {
        "transformer": "diffusers.HiDreamImageTransformer2DModel",
        "vae": "diffusers.AutoencoderKL",
        "text_encoder": "transformers.CLIPTextModelWithProjection",
        "tokenizer": "transformers.CLIPTokenizer",
        "text_encoder_2": "transformers.CLIPTextModelWithProjection",
        "tokenizer_2": "transformers.CLIPTokenizer",
        "text_encoder_3": "transformers.T5EncoderModel",
        "tokenizer_3": "transformers.T5TokenizerFast",
        "text_encoder_4": "transformers.LlamaForCausalLM",
        "tokenizer_4": "transformers.PreTrainedTokenizerFast",
    }
    # Both streams' attention, as diffusers' HiDream LoRA script and ai-toolkit train it.
    default_lora_targets = _ATTENTION
    fsdp_blocks = ("HiDreamImageTransformerBlock", "HiDreamImageSingleTransformerBlock")
    lora_target_presets = {
        "attention": _ATTENTION,
        "attention+ffn": _ATTENTION + _FFN,
        "all": _ATTENTION + _FFN + _MODULATION,
    }

    @classmethod
    def card_notes(cls, model_cfg) -> list[str]:
        tokens = (model_cfg.get("options") or {}).get("max_sequence_length", 128)
        return [
            "HiDream-I1-Full samples with real classifier-free guidance (`guidance_scale` 5.0 by default, "
            "`negative_prompt` \"\" by default); Dev and Fast are guidance-distilled: sample them with "
            f"`guidance_scale=0.0`. Sample with `max_sequence_length={tokens}`, the length it was trained with. "
            "The pipeline rescales every requested size to a 1024 x 1024 area.",
            "HiDream's repositories leave out Llama 3.1 8B Instruct: load it (`LlamaForCausalLM`, "
            "`PreTrainedTokenizerFast`) and pass it as `text_encoder_4` and `tokenizer_4` to `from_pretrained`.",
        ]

    # ---- loading ------------------------------------------------------------------------------------
    def wanted(self, name: str) -> bool:
        return self._llama_inside or name not in _LLAMA

    def load_components(self, path: str, common: dict) -> dict:
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(path, revision=common.get("revision"))
        self._llama_inside = all((index.get(name) or [None])[0] for name in _LLAMA)
        out = super().load_components(path, common)
        if not self._llama_inside:  # Llama from its own repo: no subfolder, no revision of HiDream's
            classes = self.component_classes()
            plan = self.dtype_plan()
            for name in _LLAMA:
                out[name] = classes[name].from_pretrained(self.options.llama_path, **load_kwargs(classes[name], plan.get(name), {}))
        out["tokenizer_4"].pad_token = out["tokenizer_4"].eos_token  # as HiDreamImagePipeline.__init__ sets it
        return out

    def _setup_trainable(self) -> None:
        super()._setup_trainable()
        from diffusers.models.transformers.transformer_hidream_image import MoEGate

        self._balance: list[torch.Tensor] | None = None  # the routers' balance terms of the running step
        for module in self.transformer.modules():
            if isinstance(module, MoEGate):
                module.register_forward_hook(self._note_balance)

    def _note_balance(self, gate, args, output) -> None:
        aux = output[2]  # alpha * sum_i P_i f_i in train mode, else None
        if self._balance is not None and aux is not None:
            self._balance.append(aux / gate.alpha)

    # ---- text -----------------------------------------------------------------------------------
    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        n = self.options.max_sequence_length
        pooled = torch.cat(
            [self._clip_pooled(self.tokenizer, self.text_encoder, captions, n),
             self._clip_pooled(self.tokenizer_2, self.text_encoder_2, captions, n)],
            dim=-1,
        )  # (B, D_clip_l + D_clip_g)
        t5, _ = t5_with_mask(self.tokenizer_3, self.text_encoder_3, captions, min(n, self.tokenizer_3.model_max_length), self.device)
        tokens = self.tokenizer_4(
            list(captions), padding="max_length", max_length=min(n, self.tokenizer_4.model_max_length),
            truncation=True, add_special_tokens=True, return_tensors="pt",
        )
        out = self.text_encoder_4(
            tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device), output_hidden_states=True
        )
        llama = torch.stack(out.hidden_states[1:], dim=1)  # (B, layers, L, D_llama): every layer, batch first
        return {"pooled_prompt_embeds": pooled, "prompt_embeds_t5": t5, "prompt_embeds_llama3": llama}

    def _clip_pooled(self, tokenizer, encoder, captions: Sequence[str], n: int) -> torch.Tensor:
        """A CLIP's pooled projection (B, D), over tokens padded to ``min(n, 218)``, run without a mask."""
        ids = tokenizer(list(captions), padding="max_length", max_length=min(n, CLIP_MAX), truncation=True, return_tensors="pt").input_ids
        return encoder(ids.to(self.device))[0]

    # ---- the transformer ------------------------------------------------------------------------
    def flow_shift_for(self, latents: torch.Tensor) -> float | None:
        # Full's UniPC scheduler names its shift flow_shift (the schedule reads shift, FlowMatchLCM's)
        if self.hparams.flow_shift is not None or "flow_shift" not in self.noise.config:
            return None
        return float(self.noise.config["flow_shift"])

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        dtype, (_, _, h, w) = self.denoiser_dtype, noisy.shape
        most, tokens = self.transformer.max_seq, (h // 2) * (w // 2)
        if h != w and tokens > most:  # its patchify pads a non-square image to that many tokens and cannot take more
            raise ValueError(
                f"HiDream takes at most {most} tokens of a non-square image, this bucket has {tokens} ({w * 8}x{h * 8} "
                "px): lower data.resolution (the hidream preset's 992 keeps every area bucket within 4096)"
            )
        out = self.transformer(
            hidden_states=noisy.to(dtype),  # (B, 16, h, w): the transformer cuts (and pads) its own patches
            timesteps=timesteps,  # sigma x 1000, as the pipeline passes the scheduler's timestep
            encoder_hidden_states_t5=cond["prompt_embeds_t5"].to(dtype),
            encoder_hidden_states_llama3=cond["prompt_embeds_llama3"].to(dtype).transpose(0, 1),  # (layers, B, L, D)
            pooled_embeds=cond["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
        if self.transformer.training and not self.transformer.config.force_inference_output:
            out = unpatchify(out, h, w)
        return -out  # the pipeline steps with -output: that is the velocity

    def compute_loss(self, batch: dict, generator: torch.Generator, fixed_level: float | None = None) -> torch.Tensor:
        """The shared loss, plus the routers' load-balancing loss (``aux_loss_weight``) while training."""
        self._balance = []
        try:
            loss = super().compute_loss(batch, generator, fixed_level)
            terms = self._balance
        finally:
            self._balance = None
        if not terms:  # eval mode (validation's loss): the routers compute none
            return loss
        if self._trainer is not None:
            balance = torch.stack(terms).mean().detach()
            self.log("train/moe_balance", balance, on_step=True, on_epoch=False, batch_size=len(batch["captions"]))
        if not self.options.aux_loss_weight:
            return loss
        return loss + self.options.aux_loss_weight * torch.stack(terms).sum().to(loss.dtype)

    # ---- sampling -------------------------------------------------------------------------------
    @classmethod
    def sampling_inputs(cls, height: int, width: int, pipe=None) -> dict:
        """At the asked size: the pipeline would rescale it to its default area (1024 x 1024), so ``pipe``'s default
        area is made the asked one (a hair over, so the size it rounds down to 16 px is the asked size itself)."""
        if pipe is not None:
            pipe.default_sample_size = math.sqrt(height * width) * (1 + 1e-9) / pipe.vae_scale_factor
        return super().sampling_inputs(height, width, pipe)

    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        if kwargs.get("height") and kwargs.get("width"):
            self.sampling_inputs(kwargs["height"], kwargs["width"], pipe)
        return super().sample_image(pipe, prompt, autocast, max_sequence_length=self.options.max_sequence_length, **kwargs)

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        import diffusers
        from transformers import CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM, T5EncoderModel

        from models import tiny

        torch.manual_seed(seed)
        clips = []
        for projection in (32, 48):  # CLIP-L's and CLIP-G's widths differ (768, 1280), so the tiny ones do
            config = tiny.clip_text_config()
            config.max_position_embeddings, config.projection_dim = 128, projection  # the pipeline pads to 128
            clips.append(CLIPTextModelWithProjection(config))
        llama = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=256 + len(tiny.LLAMA3_SPECIAL_TOKENS),
                hidden_size=48,
                intermediate_size=64,
                num_hidden_layers=2,  # one per transformer block (llama_layers)
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                bos_token_id=256,
                eos_token_id=265,  # <|eot_id|>
                rope_theta=500000.0,
            )
        )
        transformer = diffusers.HiDreamImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            caption_channels=[32, 48],  # T5's width, Llama's
            text_emb_dim=32 + 48,  # the two CLIPs' pooled projections
            num_routed_experts=4,  # HiDream's own: 4 routed experts, 2 active per token, and a shared one
            num_activated_experts=2,
            axes_dims_rope=(8, 4, 4),  # HiDream's (64, 32, 32) over a 16-wide head
            max_resolution=(16, 16),  # non-square latents pad to 64 tokens (128 x 128 px)
            llama_layers=[0, 1],
        )
        scheduler = diffusers.UniPCMultistepScheduler(  # HiDream-I1-Full's: UniPC over flow sigmas, shift 3
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
        return cls.pipeline_class(
            transformer=transformer,
            scheduler=scheduler,
            vae=tiny.vae16(shift_factor=0.1159, scaling_factor=0.3611),  # Flux's VAE, shift and scale
            text_encoder=clips[0],
            tokenizer=tiny.clip_tokenizer(),
            text_encoder_2=clips[1],
            tokenizer_2=tiny.clip_tokenizer(),
            text_encoder_3=T5EncoderModel(tiny.t5_config(32)),
            tokenizer_3=tiny.t5_tokenizer(model_max_length=512),
            text_encoder_4=llama,
            tokenizer_4=tiny.llama3_tokenizer(),
        )
