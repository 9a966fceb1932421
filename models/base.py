"""The shared LightningModule, driven by what a family declares, never by its name.

A family (models/sd.py, models/sdxl.py, models/sd3.py, ...) is one class that **declares** what it is:

- ``pipeline_class``: its diffusers pipeline;
- ``denoiser_name``: ``unet`` or ``transformer``, which is also its subfolder, its LoRA save keyword
  (``<denoiser>_lora_layers``) and its export folder;
- ``noise_schedule``: ``ddpm`` or ``flow`` (models/noise.py);
- ``latent_space``, ``pixel_multiple`` (what image edges must divide by), ``license``;
- ``components``: every module and tokenizer it loads, by subfolder name and class; text encoders are
  those named ``text_encoder*``;
- ``default_lora_targets`` and ``Options``, a dataclass of family-only knobs (``model.options.<key>``);
- ``fsdp_blocks``: the denoiser's block class names that ``trainer=fsdp`` shards by (tuner/runtime/scale.py).

and implements the **hooks** that differ: ``encode_prompts``, ``denoise`` and ``tiny_pipeline``, plus
any of ``load_components``, ``pipeline_components``, ``lora_layers`` and ``sample_image`` whose
defaults here do not fit. The training step, noise, trainable setup (models/trainable.py), checkpoints
and export (models/export.py) are shared.

The surface other parts use (the adapter side in models/adapters.py): ``pipeline()`` and ``sample_image`` (validation), ``trainable_state_dict()``,
``save_weights(dir)`` and ``run_identity()`` (checkpoints, export), ``data_encoders()`` (caches).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch

from models import noise as noise_schedules
from models import objectives as obj
from models import trainable
from models.adapters import AdaptersMixin
from models.encoders import EncodersMixin
from models.experts import EXPERTS, Experts
from models.guard import NonFiniteGuard
from models.optimization import OptimizationMixin
from models.paired import PairedMixin

log = logging.getLogger(__name__)


DTYPES = trainable.DTYPES


@dataclasses.dataclass
class NoOptions:
    """A family without family-only knobs."""


def resolve(path: str) -> type:
    """``"diffusers.AutoencoderKL"`` -> the class."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class lazy_class:  # noqa: N801 - used as a class attribute's value, like a class
    """A class attribute naming a class by its dotted path, imported on first use. Families name their
    pipeline this way: importing a diffusers pipeline costs about a second of start-up, and training
    needs it only when it samples or exports. ``__name__`` is known without the import."""

    def __init__(self, path: str):
        self.path = path
        self.__name__ = path.rpartition(".")[2]

    def __get__(self, obj: Any, owner: type | None = None) -> type:
        return resolve(self.path)


def pipeline_name(cls: type) -> str:
    """The family's pipeline class name, without importing the pipeline."""
    import inspect

    return inspect.getattr_static(cls, "pipeline_class").__name__


class DiffusionModule(AdaptersMixin, EncodersMixin, PairedMixin, OptimizationMixin, L.LightningModule):
    # ---- declarations (see the module docstring) ------------------------------------------------
    pipeline_class: ClassVar[type]
    denoiser_name: ClassVar[str] = "unet"
    noise_schedule: ClassVar[str] = "ddpm"
    latent_space: ClassVar[bool] = True
    pixel_multiple: ClassVar[int] = 8
    license: ClassVar[str] = "other"
    #: what the model card says of the licence beyond its name (a gated base model: how to get access)
    license_note: ClassVar[str] = ""
    components: ClassVar[dict[str, str]] = {}
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    fsdp_blocks: ClassVar[tuple[str, ...]] = ()  # denoiser block classes (diffusers names) trainer=fsdp shards by
    vae_in_fp32: ClassVar[bool] = False  # keep the VAE in fp32 under mixed precision (SDXL's overflows in fp16)
    Options: ClassVar[type] = NoOptions
    #: named target sets for ``model.lora.target_modules=[<name>]`` (e.g. attention, attention+ffn, all)
    lora_target_presets: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: names ``python -m tuner.tiny`` also accepts for this family's tiny pipeline (e.g. flux-dev, flux-schnell)
    tiny_variants: ClassVar[tuple[str, ...]] = ()
    #: packages the family needs beyond the core install: module name -> the extra that installs it
    requires: ClassVar[dict[str, str]] = {}
    #: extra keywords the family's pipeline needs to sample at any size (PixArt: no resolution binning)
    sampling_kwargs: ClassVar[dict[str, Any]] = {}
    #: how a user loads the exported LoRA (``{path}``: its folder), shown in the model card; see ``load_lora``
    lora_load_snippet: ClassVar[str] = "pipe.load_lora_weights({path!r})"
    #: family -> kohya's ss_base_model_version, for the families whose LoRA also goes out in kohya's format
    #: (``export.lora_formats=[diffusers,kohya]``: A1111/Forge, ComfyUI, CivitAI); UNet families only
    kohya_base_versions: ClassVar[dict[str, str]] = {}
    #: what one level of noise is in the timestep the pipeline passes the denoiser; None: the schedule's
    #: number of train timesteps (Flux's pipeline passes sigma itself: 1.0)
    denoiser_timestep_scale: ClassVar[float | None] = None

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        family: str,
        finetune: str = "lora",
        lora: dict | None = None,
        lycoris: dict | None = None,
        gradient_checkpointing: bool = False,
        weight_dtype: str = "fp32",
        compile: bool = False,  # noqa: A002 - the config key's name
        compile_mode: str | None = None,
        compile_dynamic: bool | None = None,
        compile_backend: str = "inductor",
        revision: str | None = None,
        variant: str | None = None,
        # a single-file base's settings: tuner/interop/base_file.py has written the folder this loads (unused here)
        base_config: str | None = None, denoiser_file: str | None = None,
        prediction_type: str | None = None,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0, logit_std: float = 1.0,
        mode_scale: float = 1.29,
        flow_shift: float | None = None,
        loss_weighting: str = "none",
        loss_type: str = "l2",
        huber_c: float = 0.1,
        huber_schedule: str = "snr",
        min_noise_level: float = 0.0, max_noise_level: float = 1.0,
        expert: str | None = None,
        expert_boundary: float = 0.35,
        experts: str | None = None,
        expert_partner: str | None = None,
        min_timestep: int | None = None, max_timestep: int | None = None,
        noise_offset: float = 0.0,
        input_perturbation: float = 0.0,
        min_snr_gamma: float | None = None,
        zero_terminal_snr: bool = False,
        prior_loss_weight: float = 1.0,
        masked_loss: bool = False,
        control: str | None = None,
        options: dict | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        caption_dropout_probability: float = 0.0,
        mixed_precision: str = "no",
        seed: int = 0,
        base_model_precision: str = "no_change",
        text_encoder_precision: str = "no_change",
        text_encoders: dict[str, str] | None = None,
        on_nonfinite: str = "stop",
        max_nonfinite_skips: int = 10,
        stochastic_rounding: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.strict_loading = False  # frozen weights are left out of checkpoints (on_save_checkpoint)
        self.options = self.Options(**dict(options or {}))
        self.nonfinite = NonFiniteGuard(on_nonfinite, max_nonfinite_skips)
        self._load(pretrained_model_name_or_path, revision, variant)
        self._setup_trainable()

    def _load(self, path: str, revision: str | None, variant: str | None) -> None:
        """The components, as attributes, and the noise schedule from the checkpoint's scheduler config."""
        from diffusers import DDPMScheduler  # any scheduler class reads a scheduler config

        for name, component in self.load_components(path, {"revision": revision, "variant": variant}).items():
            setattr(self, name, component)
        scheduler_config = dict(DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision))
        self.noise = noise_schedules.build(self.noise_schedule, scheduler_config, self.hparams)
        self.prediction_type = self.noise.prediction_type

    # ---- what a family supplies -------------------------------------------------------------
    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of captions (an empty caption is the unconditional prompt)."""
        raise NotImplementedError

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        """Call the denoiser with the family's conditioning. noisy: (B, C, h, w) -> (B, C, h, w)."""
        raise NotImplementedError

    @classmethod
    def tiny_pipeline(cls, name: str, seed: int = 0):
        """A tiny random pipeline of this family's real pipeline class (``python -m tuner.tiny``); ``name``
        is the family or one of its ``tiny_variants``."""
        raise NotImplementedError

    def image_conditioning(self, clean: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Conditioning derived from the clean training image, added to the prompt's (IF stage II: its
        noised low-res version); every random draw from ``generator``. None by default."""
        return {}

    @classmethod
    def sampling_inputs(cls, height: int, width: int, pipe=None) -> dict[str, Any]:
        """Keywords the family's pipeline needs to produce a ``height`` x ``width`` image beyond the prompt
        (``sampling_kwargs``; IF stage II adds the image it upscales; HiDream sets ``pipe``'s default area)."""
        return dict(cls.sampling_kwargs)

    @classmethod
    def load_lora(cls, pipe, path) -> None:
        """Load the LoRA this family exported (the folder ``path``) into ``pipe``: what
        ``lora_load_snippet`` shows users. diffusers' pipeline loader by default."""
        pipe.load_lora_weights(path)

    @classmethod
    def check_config(cls, model_cfg: Any) -> None:
        """Family-only checks of the settled ``cfg.model`` before anything loads (a ValueError names the key);
        none by default."""

    @classmethod
    def pixel_multiple_for(cls, model_cfg: Any) -> int:
        """The image edge multiple of the checkpoint ``model_cfg`` names (Wan 2.2 TI2V-5B's VAE: 32, its family's 16);
        the family's ``pixel_multiple`` by default."""
        return cls.pixel_multiple

    @classmethod
    def card_notes(cls, model_cfg: Any) -> list[str]:
        """Paragraphs the model card adds under "Notes" for a run of this family with ``model_cfg`` (the
        settled ``cfg.model``): what a user must know to sample it as it was trained. None by default."""
        return []

    def flow_shift_for(self, latents: torch.Tensor) -> float | None:
        """A flow shift that depends on the batch (Flux dev's, on the image's sequence length); None: the
        schedule's own (``model.flow_shift`` or the checkpoint scheduler's)."""
        return None

    def wanted(self, name: str) -> bool:
        """Whether component ``name`` is loaded (SD3 can train without its T5 encoder)."""
        return True

    def load_components(self, path: str, common: dict) -> dict[str, Any]:
        """Each declared component with ``from_pretrained`` from its subfolder, in its training dtype."""
        from models.quantize import load_time_config

        hp = self.hparams
        plan = self.dtype_plan()
        out: dict[str, Any] = {}
        for name, cls in self.component_classes().items():
            if not self.wanted(name):
                out[name] = None
                continue
            qconfig = None
            if name == self.denoiser_name:
                qconfig = load_time_config(hp.base_model_precision, DTYPES[hp.mixed_precision])
            out[name] = cls.from_pretrained(path, subfolder=name, **trainable.load_kwargs(cls, plan.get(name), common, qconfig))
        return out

    @classmethod
    def component_classes(cls) -> dict[str, type]:
        """Each declared component's class, imported."""
        return {name: resolve(path) for name, path in cls.components.items()}

    def pipeline_components(self) -> dict[str, Any]:
        """Keyword arguments for ``pipeline_class`` beyond the scheduler, from the in-memory modules."""
        return {name: getattr(self, name) for name in self.components}

    def pipeline_load_overrides(self) -> dict[str, Any]:
        """Components to leave out when the full pipeline is written from the base checkpoint."""
        return {name: None for name in self.components if not self.wanted(name)}

    def denoiser_slot(self) -> str:
        """The pipeline component the trained denoiser is written as in a full export: ``denoiser_name``, or the
        expert's own where a checkpoint's experts are components of their own (Wan 2.2 A14B's ``transformer_2``)."""
        return self.denoiser_name

    # ---- setup ----------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The denoiser that runs now: the one, or the step's expert's where each expert is a denoiser of its own."""
        return getattr(self, self.__dict__.get("active_denoiser") or self.denoiser_name)

    @classmethod
    def text_encoder_names(cls) -> list[str]:
        return [n for n in cls.components if n.startswith("text_encoder")]

    def dtype_plan(self) -> dict[str, torch.dtype]:
        hp = self.hparams
        trained = trainable.WEIGHT_DTYPES[str(hp.weight_dtype)]
        return trainable.dtype_plan(list(self.components), self.denoiser_name, hp.finetune, hp.mixed_precision, self.vae_in_fp32, trained)

    def text_encoder_levels(self) -> dict[str, str]:
        """Quantisation level per text encoder: ``quantization.text_encoders.<name>``, else the shared level."""
        given = dict(self.hparams.text_encoders or {})
        return {n: given.get(n) or self.hparams.text_encoder_precision for n in self.text_encoder_names()}

    def _setup_trainable(self) -> None:
        hp = self.hparams
        for module in self.children():
            module.requires_grad_(False)
        plan = self.dtype_plan()
        # Held as plain attributes: diffusers' ``ModelMixin.dtype`` walks every parameter on each read,
        # which cost ~5 ms a step on the tiny model.
        self.vae_dtype = plan.get("vae", DTYPES[hp.mixed_precision])
        self.text_dtype = DTYPES[hp.mixed_precision]
        self.denoiser_dtype = plan[self.denoiser_name]
        self.trained_dtype = trainable.WEIGHT_DTYPES[str(hp.weight_dtype)]  # of the LoRA / the full weights
        denoisers = {name: hp.base_model_precision for name in self.denoiser_names()}
        trainable.quantize_frozen(self, {**denoisers, **self.text_encoder_levels()})
        lora = {**dict(hp.lora or {}), "target_modules": self.lora_targets((hp.lora or {}).get("target_modules"))}
        # one adapter per expert: on the one denoiser, or on each expert's own (named after the expert either way)
        adapters = EXPERTS if hp.experts == "two_lora" else ("default",)
        hosts = {name: (expert,) for expert, name in (self.expert_denoisers() or {}).items()}
        for name, names in (hosts or {self.denoiser_name: adapters}).items():
            trainable.setup_adapter(getattr(self, name), hp.finetune, lora, self.default_lora_targets, hp.gradient_checkpointing, names, self.trained_dtype)
        self.setup_text_encoder_lora()  # model.lora.text_encoders (models/adapters.py)
        if hp.finetune == "lycoris":  # LoKr/LoHa: its own module (its parameters train, checkpoint and average)
            self.lycoris_prefix = prefix = trainable.lycoris_prefix(self.denoiser_name)
            self.lycoris_net = trainable.lycoris_network(self.denoiser, dict(hp.lycoris or {}), lora["target_modules"], prefix, self.trained_dtype)
        # split-schedule experts sharing this denoiser (models/experts.py); None for a plain run
        self.experts = Experts(self) if hp.experts or hp.expert_partner else None
        if hp.compile:  # in place, after the adapters: the compiled forward runs them
            for name in self.denoiser_names():
                getattr(self, name).compile(mode=hp.compile_mode, dynamic=hp.compile_dynamic, backend=hp.compile_backend)
        self.n_trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        log.info("%s: %s trainable parameters (%s)", type(self).__name__, f"{self.n_trainable:,}", hp.finetune)

    def summary(self) -> str:
        """One line for the console: what loaded and what trains."""
        hp = self.hparams
        what = f"{hp.finetune} ({hp.experts})" if hp.experts else hp.finetune
        what += f", control {hp.control}" if hp.control else ""
        return f"{hp.family} from {hp.pretrained_model_name_or_path}, {what}, {self.n_trainable:,} trainable parameters"

    def train(self, mode: bool = True):
        # Lightning puts the whole module in train mode; frozen parts stay in eval (no dropout).
        super().train(mode)
        for name, module in self.named_children():
            if name not in (*self.denoiser_names(), *self.trained_text_encoders(), "lycoris_net"):
                module.eval()
        return self

    def on_fit_start(self) -> None:
        # Lightning keeps the modes it finds, and from_pretrained leaves the denoiser in eval: train from step 0
        self.train()
        self.noise.to(self.device)
        if self.experts is not None:
            self.experts.to(self.device)

    # ---- training -------------------------------------------------------------------------------
    def _step_generator(self, batch_idx: int) -> torch.Generator:
        # Every random draw of a step comes from a generator keyed by (seed, epoch, batch, rank), so a
        # resumed run draws exactly what a straight run would, without saving RNG state.
        seed = obj.step_seed(self.hparams.seed, self.current_epoch, batch_idx, self.global_rank)
        return torch.Generator().manual_seed(seed)

    def compute_loss(self, batch: dict, generator: torch.Generator, fixed_level: float | None = None) -> torch.Tensor:
        """The training loss of a batch, every random draw from ``generator``. With ``fixed_level`` (a
        fraction of the schedule; validation) every sample is noised to that level and no caption drops."""
        hp = self.hparams
        self.noise.to(self.device)
        # a two-expert run samples inside the step's expert's range (its adapter on); else the run's range
        schedule = self.noise if self.experts is None else self.experts.schedule_for(fixed_level)
        p_drop = hp.caption_dropout_probability if fixed_level is None else 0.0
        with torch.no_grad():
            encoded = batch["encoded"] if "encoded" in batch else self.encode_pixels(batch["pixels"])
            latents = self.model_inputs(encoded, generator).float()
            dropped = obj.dropout_mask(len(batch["captions"]), p_drop, generator)
        # a text encoder with a LoRA (model.lora.text_encoders) trains through the prompt's encoding
        with nullcontext() if self.trained_text_encoders() and fixed_level is None else torch.no_grad():
            if "cond" in batch:  # text embeddings from the cache
                cond = self.drop_cond(batch["cond"], dropped)
            else:
                captions = ["" if d else c for c, d in zip(batch["captions"], dropped, strict=True)]
                # a prompt read with its input image (Qwen-Image-Edit) is encoded with the batch's references
                given = (batch["reference_pixels"],) if self.prompt_uses_references else ()
                cond = self.encode_prompts(captions, *given)
        noise = obj.offset_noise(obj.randn(latents.shape, generator, latents), hp.noise_offset, generator)
        n = latents.shape[0]
        if fixed_level is None:
            timesteps = schedule.sample(n, generator, self.flow_shift_for(latents))
        else:
            timesteps = self.noise.at_level(fixed_level, n)
        noisy = self.noise.noisy(latents, obj.perturb_noise(noise, hp.input_perturbation, generator), timesteps)
        with torch.no_grad():
            cond = {**cond, **self.image_conditioning(latents, generator)}
        pred = self.denoise(noisy, timesteps, cond, batch)
        tgt = self.noise.target(latents, noise, timesteps)
        loss = obj.elementwise_loss(str(hp.loss_type), pred, tgt, self.noise, timesteps, hp.huber_c, str(hp.huber_schedule))
        return obj.weighted_loss(loss, self.loss_weights(batch, timesteps), self.loss_mask(batch, pred))

    def loss_weights(self, batch: dict, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights (B,), float32, on the timesteps' (the loss's) device: the schedule's
        (min-SNR, flow weighting) times prior preservation's for regularisation images."""
        weights = self.noise.weights(timesteps).to(timesteps.device, torch.float32)
        if "is_regularisation" in batch and self.hparams.prior_loss_weight != 1.0:
            # Prior preservation (DreamBooth, Ruiz et al. 2023): regularisation images' loss is scaled.
            regularisation = batch["is_regularisation"].to(weights.device)
            weights = weights * torch.where(regularisation, self.hparams.prior_loss_weight, 1.0)
        return weights

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "rank %d epoch %d batch %d: %s", self.global_rank, self.current_epoch, batch_idx, batch["captions"]
            )
        if self.experts is not None:
            self.experts.begin_step(batch_idx)
        loss = self.compute_loss(batch, self._step_generator(batch_idx))
        self.nonfinite.note_loss(loss)
        self.log(
            "train/loss",
            loss,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            sync_dist=True,
            batch_size=len(batch["captions"]),
        )
        return loss

    # ---- checkpoints and export -------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that train, by their module path: all a checkpoint needs of the weights."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def nonfinite_weights(self) -> list[str]:
        """The trainable parameters (this rank's shards) holding a NaN or infinity: none may be saved."""
        local = {name: p.to_local() if hasattr(p, "to_local") else p for name, p in self.trainable_state_dict().items()}
        return [name for name, p in local.items() if not bool(torch.isfinite(p).all())]

    # ---- split-schedule experts (models/experts.py) -------------------------------------------------
    def denoiser_level(self, timestep: torch.Tensor) -> float:
        """The noise level (0..1) of a timestep as the pipeline passes it to the denoiser."""
        return float(timestep.flatten()[0]) / (self.denoiser_timestep_scale or self.noise.num_timesteps)

    def sampling_context(self):
        """Around validation sampling: each denoiser call served by the expert owning its level."""
        return self.experts.sampling() if self.experts is not None else nullcontext()

    def parameters_to_average(self, names: list[str]) -> list[str]:
        """Of the trainable parameters, those the EMA updates now: a two-expert run's trained experts'."""
        return names if self.experts is None else self.experts.updated_parameters(names)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Frozen VAE, text encoders and (under LoRA) the base denoiser stay out of .ckpt files.
        keep = set(self.trainable_state_dict())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["tuner_model"] = self.run_identity()
        if self.trainer is not None and self.trainer.optimizers:
            checkpoint["tuner_optimizer"] = type(self.trainer.optimizers[0]).__name__
        checkpoint["tuner_nonfinite"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Loading is not strict (frozen weights are not in the file), so check the other direction
        # here: every weight that trains must come back, or the resume would silently start over.
        missing = sorted(set(self.trainable_state_dict()) - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} of this run's trainable weights (e.g. {missing[0]!r}); "
                "was it written with another model.finetune or model.lora setting?"
            )
        self.nonfinite.load_state_dict(checkpoint.get("tuner_nonfinite", {}))
        if self.optimizer_factory is not None:  # a resume takes the optimiser's settings from the config
            lr = (self.hparams.lora or {}).get("text_encoder_lr")
            trainable.apply_config_to_optimizer_state(checkpoint, self.optimizer_factory, lr)

    def pipeline(self):
        """The family's diffusers pipeline, assembled from the in-memory modules (nothing reloaded)."""
        return self.pipeline_class(scheduler=self.noise.sampling_scheduler(), **self.pipeline_components())

    @torch.no_grad()
    def sample_image(self, pipe, prompt: str, autocast=None, **kwargs):
        """One validation image: the denoising loop under ``autocast`` (the run's precision), the VAE
        decode outside it, in the VAE's own dtype (SDXL's fp32 VAE must not decode in half precision)."""
        with autocast or nullcontext():
            latents = pipe(prompt, output_type="latent", **{**self.sampling_kwargs, **kwargs}).images
        with torch.autocast(self.device.type, enabled=False):
            return self.decode_latents(pipe, latents)

    def decode_latents(self, pipe, latents: torch.Tensor):
        """Latents from ``pipe(output_type="latent")`` -> a PIL image."""
        config = self.vae.config
        latents = latents.to(self.vae.device, self.vae_dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        image = self.vae.decode(latents).sample
        return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]

    def save_weights(self, directory: str | Path, full_pipeline: bool = True, suffix: str = "") -> Path:
        """The trained weights in diffusers format (models/export.py): the LoRA file or ``pipeline/``."""
        from models.export import save_weights

        return save_weights(self, directory, full_pipeline, suffix)
