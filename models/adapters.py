"""The adapter side of a family module: which layers the LoRA targets, the adapters a run trains (one, or
one per split-schedule expert), their layers as the export writes them, and the identity a checkpoint
must share with the run that resumes it. Mixed into ``DiffusionModule``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from models.experts import EXPERTS

#: a CLIP text encoder's attention projections: the text-encoder LoRA targets of diffusers' scripts and kohya's
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


class AdaptersMixin:
    #: expert -> component, for a checkpoint that is split-schedule experts of its own (Wan 2.2 A14B's
    #: ``transformer`` / ``transformer_2``); a two-expert run then trains one adapter on each (models/experts.py)
    expert_subfolders: ClassVar[dict[str, str]] = {}
    #: text encoder -> its default LoRA targets, for the encoders the family's pipeline loads a LoRA into
    #: (``model.lora.text_encoders``; diffusers' ``<encoder>_lora_layers`` keywords); none by default
    text_encoder_lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {}

    def trained_text_encoders(self) -> list[str]:
        """The text encoders this run trains a LoRA on (``model.lora.text_encoders``)."""
        hp = self.hparams
        return list((hp.lora or {}).get("text_encoders") or []) if hp.finetune == "lora" else []

    def setup_text_encoder_lora(self) -> None:
        """A LoRA (peft, adapter ``default``) on each trained text encoder, of the denoiser LoRA's rank, alpha and
        dropout, on ``model.lora.text_encoder_target_modules`` or the family's targets; only it trains, in fp32."""
        from models.trainable import setup_adapter

        lora = dict(self.hparams.lora or {})
        for name in self.trained_text_encoders():
            targets = lora.get("text_encoder_target_modules") or self.text_encoder_lora_targets[name]
            encoder = getattr(self, name)
            settings = {**lora, "use_dora": False, "target_modules": list(targets)}
            setup_adapter(encoder, "lora", settings, (), False, dtype=self.trained_dtype)
            if self.hparams.gradient_checkpointing and getattr(encoder, "supports_gradient_checkpointing", False):
                encoder.gradient_checkpointing_enable()

    def lora_adapters(self) -> list[tuple[str, str]]:
        """(adapter name, file-name tag) of each LoRA this run trains: one, or one per split-schedule expert."""
        if self.hparams.experts == "two_lora":
            return [(name, f"_{name}") for name in EXPERTS]
        return [("default", "")]

    def expert_denoisers(self) -> dict[str, str] | None:
        """Split-schedule experts that are denoisers of their own, expert -> component (``expert_subfolders``, when
        this run loaded them all: Wan 2.2 A14B's ``transformer`` and ``transformer_2``), each with its one adapter;
        None: the experts (if any) are adapters of the one denoiser."""
        own = self.expert_subfolders
        return dict(own) if own and all(getattr(self, n, None) is not None for n in own.values()) else None

    @classmethod
    def checkpoint_experts(cls, model_cfg: Any) -> dict[str, str] | None:
        """``expert_denoisers`` of a two-expert run on the checkpoint ``model_cfg`` names, known before it loads
        (the model card's loading snippet): where the checkpoint has every ``expert_subfolders`` component."""
        from models.trainable import model_index

        if not model_cfg.get("experts") or not cls.expert_subfolders:
            return None
        index = model_index(model_cfg.pretrained_model_name_or_path, model_cfg.get("revision")) or {}
        has = all((index.get(name) or [None])[0] is not None for name in cls.expert_subfolders.values())
        return dict(cls.expert_subfolders) if has else None

    def denoiser_names(self) -> list[str]:
        """Every denoiser component this run trains."""
        return list((self.expert_denoisers() or {self.denoiser_name: self.denoiser_name}).values())

    def adapter_host(self, adapter: str) -> Any:
        """The denoiser holding ``adapter``: the one, or the expert's own (Wan 2.2 A14B's ``transformer_2``)."""
        return getattr(self, (self.expert_denoisers() or {}).get(adapter, self.denoiser_name))

    def lora_layers(self, adapter: str = "default") -> dict[str, Any]:
        """``save_lora_weights`` keywords: one adapter of the denoiser, in diffusers format, under its own name.
        An expert's own denoiser's adapter is written under the denoiser's name too: its pipeline's loader puts
        it into that denoiser (``load_into_transformer_2=True``)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        name, host = self.denoiser_name, self.adapter_host(adapter)
        layers = get_peft_model_state_dict(host, adapter_name=adapter)
        if name == "unet":
            # UNet LoRAs are saved in diffusers' own key format (lora.down/up), as the diffusers UNet
            # scripts write them; transformer LoRAs stay in peft's format, which their loaders expect
            # (converting would rename only the layers the UNet mapping knows, and those would not load).
            # The mapping knows attention's to_q/k/v/out: a UNet LoRA on other layers too (IF's added
            # key/value projections) stays whole in peft's format, which the loader also reads; a file
            # half in each format would not load.
            converted = convert_state_dict_to_diffusers(layers)
            if not any(".lora_A." in k or ".lora_B." in k for k in converted):
                layers = converted
        out = {
            f"{name}_lora_layers": layers,
            # rank, alpha and targets travel with the weights, so a LoRA with alpha != rank loads at its
            # trained strength (without it diffusers assumes alpha = rank).
            f"{name}_lora_adapter_metadata": host.peft_config[adapter].to_dict(),
        }
        for encoder_name, encoder_layers in self.text_encoder_lora_layers().items():  # text_encoder., text_encoder_2.
            # diffusers' own keys (lora_linear_layer.down/up), as its scripts write them, for any layer name: its
            # converter knows CLIP's, and its loader reads no other format for a text encoder (ChatGLM's would fail)
            out[f"{encoder_name}_lora_layers"] = {
                k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): v
                for k, v in encoder_layers.items()
            }
            out[f"{encoder_name}_lora_adapter_metadata"] = getattr(self, encoder_name).peft_config["default"].to_dict()
        return out

    def text_encoder_lora_layers(self) -> dict[str, dict[str, Any]]:
        """Each trained text encoder's LoRA (peft's keys, without the encoder's name), under the module paths of the
        encoder's checkpoint: transformers 5's ``CLIPTextModel`` has no ``text_model.`` level, which its files and
        every other reader (transformers 4, A1111, ComfyUI) have; diffusers' loader strips it where the model lacks it."""
        from peft.utils import get_peft_model_state_dict

        out = {}
        for name in self.trained_text_encoders():
            encoder = getattr(self, name)
            layers = get_peft_model_state_dict(encoder, adapter_name="default")
            if type(encoder).__name__ == "CLIPTextModel" and not hasattr(encoder, "text_model"):
                layers = {f"text_model.{k}": v for k, v in layers.items()}
            out[name] = layers
        return out

    @classmethod
    def lora_targets(cls, target_modules: Sequence[str] | None) -> list[str]:
        """``model.lora.target_modules`` resolved: the family's default when unset, a named preset
        (``[attention+ffn]``) expanded, else the module names as given."""
        if not target_modules:
            return list(cls.default_lora_targets)
        if len(target_modules) == 1 and target_modules[0] in cls.lora_target_presets:
            return list(cls.lora_target_presets[target_modules[0]])
        return list(target_modules)

    @classmethod
    def identity(
        cls,
        family: str,
        base_model: str,
        finetune: str,
        lora: dict | None,
        expert: str | None = None,
        lycoris: dict | None = None,
    ) -> dict:
        """What a checkpoint must share with the run that resumes it: stored in every checkpoint and
        compared before any weight loads (callbacks.checkpoints.check_resumable)."""
        out: dict[str, Any] = {"family": family, "base_model": str(base_model), "finetune": str(finetune)}
        out["expert"] = expert  # a split-schedule expert resumes as the same expert
        if finetune == "lycoris":
            out.update({f"lycoris_{k}": v for k, v in sorted(dict(lycoris or {}).items())})
        if finetune == "lora":
            lora = dict(lora or {})
            rank = int(lora.get("rank", 16))  # >= 1: tuner.config checks it before load
            out.update(
                lora_rank=rank,
                lora_alpha=float(rank if lora.get("alpha") is None else lora["alpha"]),
                lora_target_modules=sorted(cls.lora_targets(lora.get("target_modules"))),
            )
            out["lora_text_encoders"] = sorted(lora.get("text_encoders") or [])
            out["lora_text_encoder_targets"] = sorted(lora.get("text_encoder_target_modules") or [])
        return out

    def run_identity(self) -> dict:
        hp = self.hparams
        from models.trainable import base_identity

        return self.identity(
            hp.family, base_identity(hp.pretrained_model_name_or_path), hp.finetune, hp.lora, hp.experts or hp.expert, hp.lycoris
        )
