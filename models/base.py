"""The shared LightningModule: everything a diffusion family does the same way.

A family subclass (models/sd.py, models/sdxl.py) supplies only what differs: how its components load,
how prompts are encoded, how the denoiser is called and how its diffusers pipeline is assembled.
This base owns the training step (built from models/objectives.py), LoRA/full setup through peft,
optimiser wiring over the trainable parameters only, slim checkpoints and export.

The surface other parts use: ``pipeline()`` (sampling), ``trainable_state_dict()`` and
``save_weights(dir)`` (export), ``encode_images`` / ``encode_prompts`` (caching).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch

from models import objectives as obj

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DiffusionModule(L.LightningModule):
    #: diffusers pipeline class, used for LoRA export and ``pipeline()``.
    pipeline_class: ClassVar[type]
    #: peft target modules when ``lora.target_modules`` is not set.
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    #: keep the VAE in fp32 under mixed precision (SDXL's VAE overflows in fp16).
    vae_in_fp32: ClassVar[bool] = False

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        family: str,
        finetune: str = "lora",
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
        revision: str | None = None,
        variant: str | None = None,
        prediction_type: str | None = None,
        timestep_sampling: str = "uniform",
        min_timestep: int = 0,
        max_timestep: int | None = None,
        noise_offset: float = 0.0,
        input_perturbation: float = 0.0,
        min_snr_gamma: float | None = None,
        zero_terminal_snr: bool = False,
        prior_loss_weight: float = 1.0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        caption_dropout_probability: float = 0.0,
        mixed_precision: str = "no",
        seed: int = 0,
        base_model_precision: str = "no_change",
        text_encoder_precision: str = "no_change",
        text_encoder_2_precision: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        # Frozen weights are left out of checkpoints (on_save_checkpoint), so loading is not strict.
        self.strict_loading = False

        load_kwargs = {"revision": revision, "variant": variant}
        for name, component in self.load_components(pretrained_model_name_or_path, load_kwargs).items():
            setattr(self, name, component)
        self._setup_noise_schedule(pretrained_model_name_or_path, revision)
        self._setup_trainable(finetune, dict(lora or {}), DTYPES[mixed_precision], gradient_checkpointing)

    # ---- what a family supplies -------------------------------------------------------------
    def load_components(self, path: str, load_kwargs: dict) -> dict[str, Any]:
        """Load ``unet``, ``vae``, text encoders and tokenizers with ``from_pretrained``."""
        raise NotImplementedError

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of captions (an empty caption is the unconditional prompt)."""
        raise NotImplementedError

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        """Call the denoiser with the family's conditioning. noisy: (B, C, h, w) -> (B, C, h, w)."""
        raise NotImplementedError

    def pipeline_components(self) -> dict[str, Any]:
        """Keyword arguments for ``pipeline_class`` beyond the scheduler, from the in-memory modules."""
        raise NotImplementedError

    def lora_layers(self) -> dict[str, dict[str, torch.Tensor]]:
        """``save_lora_weights`` keyword -> diffusers-format LoRA state dict. The denoiser by default."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return {
            "unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet)),
            # rank, alpha and targets travel with the weights, so a LoRA with alpha != rank loads at its
            # trained strength (without it diffusers assumes alpha = rank).
            "unet_lora_adapter_metadata": self.unet.peft_config["default"].to_dict(),
        }

    def unet_load_kwargs(self, load_kwargs: dict) -> dict:
        """``from_pretrained`` keywords for the denoiser: the shared ones, plus nf4 quantisation if asked."""
        from models.quantize import load_time_config

        qconfig = load_time_config(self.hparams.base_model_precision, DTYPES[self.hparams.mixed_precision])
        return {**load_kwargs, "quantization_config": qconfig} if qconfig is not None else dict(load_kwargs)

    # ---- setup ----------------------------------------------------------------------------------
    def _setup_noise_schedule(self, path: str, revision: str | None) -> None:
        from diffusers import DDPMScheduler

        # The checkpoint's own inference scheduler (PNDM, DDIM, Euler...), for the exported pipeline.
        self.scheduler_config = dict(DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision))
        # Training needs only its noise schedule; DDPM's sampling options (clip_sample) never apply.
        sched = DDPMScheduler.from_config(self.scheduler_config, clip_sample=False)
        betas = sched.betas
        if self.hparams.zero_terminal_snr:
            betas = obj.rescale_zero_terminal_snr(betas)
            # Sample with the same schedule it trained on (Lin et al. 2023, sec. 3.3: trailing timesteps).
            self.scheduler_config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        alphas_cumprod = torch.cumprod(1.0 - betas.float(), 0)
        if self.hparams.zero_terminal_snr:
            # Exactly 0 makes SNR 0 and the epsilon min-SNR weight 0/0; diffusers' schedulers use 2^-24 too.
            alphas_cumprod[-1] = 2**-24
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.prediction_type = self.hparams.prediction_type or sched.config.prediction_type
        if self.prediction_type not in obj.PREDICTION_TYPES:
            raise ValueError(
                f"model.prediction_type={self.prediction_type!r}; valid: {', '.join(obj.PREDICTION_TYPES)}"
            )
        self.scheduler_config["prediction_type"] = self.prediction_type
        max_t = self.hparams.max_timestep
        if max_t is not None and max_t > len(alphas_cumprod):
            raise ValueError(f"model.max_timestep={max_t} is beyond the schedule's {len(alphas_cumprod)} timesteps")
        if self.hparams.zero_terminal_snr and self.prediction_type != "v_prediction":
            log.warning(
                "zero_terminal_snr with %s prediction: the last timestep has nothing to predict", self.prediction_type
            )

    def _setup_trainable(self, finetune: str, lora: dict, weight_dtype: torch.dtype, checkpointing: bool) -> None:
        for module in self.children():
            module.requires_grad_(False)
        vae_dtype = torch.float32 if self.vae_in_fp32 else weight_dtype
        for name, module in self.named_children():
            dtype = vae_dtype if name == "vae" else weight_dtype
            frozen = name != "unet" or finetune == "lora"
            if frozen and next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
        # Held as plain attributes: diffusers' ``ModelMixin.dtype`` walks every parameter on each read,
        # which cost ~5 ms a step on the tiny model.
        self.vae_dtype = vae_dtype
        self.text_dtype = weight_dtype
        self.unet_dtype = weight_dtype if finetune == "lora" else torch.float32
        # Quantise the frozen weights after the cast and before the adapter (models/quantize.py).
        from models.quantize import quantize_module

        if self.hparams.base_model_precision != "nf4-bnb":  # nf4 was applied while loading
            quantize_module(self.unet, self.hparams.base_model_precision)
        for name, module in self.named_children():
            if name.startswith("text_encoder"):
                level = self.hparams.text_encoder_precision
                if name == "text_encoder_2" and self.hparams.text_encoder_2_precision:
                    level = self.hparams.text_encoder_2_precision
                quantize_module(module, level)
        if finetune == "lora":
            from diffusers.training_utils import cast_training_params
            from peft import LoraConfig

            rank = int(lora.get("rank", 16))
            config = LoraConfig(
                r=rank,
                lora_alpha=lora.get("alpha") or rank,
                lora_dropout=float(lora.get("dropout", 0.0)),
                init_lora_weights="gaussian",
                target_modules=list(lora.get("target_modules") or self.default_lora_targets),
            )
            self.unet.add_adapter(config)
            cast_training_params(self.unet, dtype=torch.float32)  # only what trains is upcast
        elif finetune == "full":
            self.unet.requires_grad_(True)
        else:
            raise ValueError(f"model.finetune={finetune!r}; valid: lora, full")
        if checkpointing:
            self.unet.enable_gradient_checkpointing()
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        log.info("%s: %s trainable parameters (%s)", type(self).__name__, f"{n_train:,}", finetune)

    def train(self, mode: bool = True):
        # Lightning puts the whole module in train mode; frozen parts stay in eval (no dropout).
        super().train(mode)
        for name, module in self.named_children():
            if name != "unet":
                module.eval()
        return self

    # ---- training -------------------------------------------------------------------------------
    @torch.no_grad()
    def image_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], (B, 3, H, W) -> the VAE posterior's mean and log-variance (B, 2C, H/8, W/8).

        This is the deterministic half of encoding, so it is what the latent cache stores; the sample is
        drawn per step (``latents_from_moments``) exactly as without a cache.
        """
        # Lightning's autocast covers the whole step; a VAE kept in fp32 must also compute in fp32.
        keep_fp32 = torch.autocast(self.device.type, enabled=False) if self.vae_in_fp32 else nullcontext()
        with keep_fp32:
            return self.vae.encode(pixels.to(self.vae.device, self.vae_dtype)).latent_dist.parameters

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample, shifted and scaled into the denoiser's latent space. (B, C, H/8, W/8)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents = DiagonalGaussianDistribution(moments.to(self.device)).sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1], (B, 3, H, W) -> scaled latents (B, C, H/8, W/8)."""
        return self.latents_from_moments(self.image_moments(pixels), generator)

    @torch.no_grad()
    def unconditional(self) -> dict[str, torch.Tensor]:
        """The empty prompt's conditioning (batch of 1), kept so a dropped caption needs no text encoder."""
        if getattr(self, "_uncond", None) is None:
            self._uncond = {k: v[:1].detach() for k, v in self.encode_prompts([""]).items()}
        return self._uncond

    def drop_cond(self, cond: dict[str, torch.Tensor], dropped: list[bool]) -> dict[str, torch.Tensor]:
        """Cached conditioning with the dropped rows replaced by the unconditional one."""
        if not any(dropped):
            return cond
        uncond = self.unconditional()
        out = {}
        for key, value in cond.items():
            mask = torch.tensor(dropped, device=value.device).view(-1, *([1] * (value.ndim - 1)))
            out[key] = torch.where(mask, uncond[key].to(value), value)
        return out

    def _weights_fingerprint(self, subfolders: Sequence[str]) -> str:
        """What identifies the weights in ``subfolders`` of the checkpoint: for a local folder the files'
        names, sizes and mtimes (a swapped-in VAE changes it); for a Hub id the snapshot's commit."""
        hp = self.hparams
        root = Path(hp.pretrained_model_name_or_path)
        parts: list[Any] = []
        for sub in subfolders:
            if root.is_dir():
                parts += [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted((root / sub).glob("*"))]
            else:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(str(root), f"{sub}/config.json", revision=hp.revision)
                parts.append(Path(cached).parts[-3] if isinstance(cached, str) else hp.revision)
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    def data_encoders(self) -> dict[str, Any]:
        """What the data module's latent and text-embedding caches need of this model (see run.py)."""
        hp = self.hparams
        base = f"{hp.pretrained_model_name_or_path}@{hp.revision}:{hp.variant}:{type(self).__name__}"
        text_parts = [n for n, _ in self.named_children() if n.startswith("text_encoder")]
        text_parts += [n for n in vars(self) if n.startswith("tokenizer")]
        vae_id = f"{base}:vae:{self.vae_dtype}:{self._weights_fingerprint(['vae'])}"
        text_id = (
            f"{base}:text:{self.text_dtype}:{self.hparams.text_encoder_precision}:"
            f"{self.hparams.text_encoder_2_precision}:"
            f"{self._weights_fingerprint(sorted(text_parts))}"
        )
        return {
            "image_moments": self.image_moments,
            "encode_prompts": self.encode_prompts,
            "identity": {"vae": vae_id, "text": text_id},
            "offload": self.offload_encoders,
        }

    def encoders_on_device(self):
        """Bring offloaded VAE and text encoders back to the compute device (for sampling); returns a
        function that puts them back where they were."""
        moved = []
        for name, module in self.named_children():
            if name == "vae" or name.startswith("text_encoder"):
                where = next(module.parameters()).device
                if where != self.device:
                    module.to(self.device)
                    moved.append((module, where))

        def restore() -> None:
            for module, where in moved:
                module.to(where)

        return restore

    def offload_encoders(self, vae: bool, text: bool) -> None:
        """Move the VAE and/or text encoders off the accelerator once the caches hold what they would compute."""
        if text:
            self.unconditional()  # still needed for caption dropout
        for name, module in self.named_children():
            if (vae and name == "vae") or (text and name.startswith("text_encoder")):
                module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _step_generator(self, batch_idx: int) -> torch.Generator:
        # Every random draw of a step comes from a generator keyed by (seed, epoch, batch, rank), so a
        # resumed run draws exactly what a straight run would, without saving RNG state.
        seed = obj.step_seed(self.hparams.seed, self.current_epoch, batch_idx, self.global_rank)
        return torch.Generator().manual_seed(seed)

    def compute_loss(self, batch: dict, generator: torch.Generator, fixed_timestep: int | None = None) -> torch.Tensor:
        """The training loss of a batch, every random draw from ``generator``. With ``fixed_timestep``
        (validation) every sample uses that timestep and no caption is dropped."""
        hp = self.hparams
        p_drop = hp.caption_dropout_probability if fixed_timestep is None else 0.0
        with torch.no_grad():
            moments = batch["moments"] if "moments" in batch else self.image_moments(batch["pixels"])
            latents = self.latents_from_moments(moments, generator).float()
            dropped = obj.dropout_mask(len(batch["captions"]), p_drop, generator)
            if "cond" in batch:  # text embeddings from the cache
                cond = self.drop_cond(batch["cond"], dropped)
            else:
                cond = self.encode_prompts(["" if d else c for c, d in zip(batch["captions"], dropped, strict=True)])
        noise = obj.offset_noise(obj.randn(latents.shape, generator, latents), hp.noise_offset, generator)
        if fixed_timestep is None:
            timesteps = obj.sample_timesteps(
                latents.shape[0],
                len(self.alphas_cumprod),
                generator,
                hp.timestep_sampling,
                hp.min_timestep,
                hp.max_timestep,
            ).to(self.device)
        else:
            timesteps = torch.full((latents.shape[0],), fixed_timestep, dtype=torch.long, device=self.device)
        noisy = obj.add_noise(
            latents, obj.perturb_noise(noise, hp.input_perturbation, generator), self.alphas_cumprod, timesteps
        )
        pred = self.denoise(noisy, timesteps, cond, batch)
        tgt = obj.target(self.prediction_type, latents, noise, self.alphas_cumprod, timesteps)
        weights = torch.ones(latents.shape[0])
        if hp.min_snr_gamma:
            snr = obj.snr(self.alphas_cumprod, timesteps)
            weights = obj.min_snr_weights(snr, hp.min_snr_gamma, self.prediction_type)
        if "is_regularisation" in batch and hp.prior_loss_weight != 1.0:
            # Prior preservation (DreamBooth, Ruiz et al. 2023): regularisation images' loss is scaled.
            weights = weights * torch.where(batch["is_regularisation"].cpu(), hp.prior_loss_weight, 1.0)
        return obj.weighted_mse(pred, tgt, weights)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "rank %d epoch %d batch %d: %s", self.global_rank, self.current_epoch, batch_idx, batch["captions"]
            )
        loss = self.compute_loss(batch, self._step_generator(batch_idx))
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

    def on_train_start(self) -> None:
        # A resume restores the learning rate the old run last set. If the run's length changed
        # (max_train_steps raised to train on), the schedule is a new curve: take its value at this step
        # now, not one step late. With an unchanged length this is the very value restored.
        from torch.optim.lr_scheduler import LambdaLR

        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, LambdaLR) and scheduler.last_epoch > 0:
                lrs = [
                    base * fn(scheduler.last_epoch)
                    for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
                ]
                for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
                    group["lr"] = lr
                scheduler._last_lr = lrs

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Clipping computes the total gradient norm anyway; log that one rather than computing it twice.
        # (Lightning calls this after un-scaling fp16 gradients, so the norm is the true one.)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        if gradient_clip_val:
            norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.log("grad_norm", norm, on_step=True, on_epoch=False)  # before clipping: spikes show here

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured")
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(
            optimizer, num_training_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    # ---- checkpoints and export -------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that train, by their module path: all a checkpoint needs of the weights."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    @classmethod
    def identity(cls, family: str, base_model: str, finetune: str, lora: dict | None) -> dict:
        """What a checkpoint must share with the run that resumes it: stored in every checkpoint and
        compared before any weight loads (callbacks.checkpoints.check_resumable)."""
        out: dict[str, Any] = {"family": family, "base_model": str(base_model), "finetune": str(finetune)}
        if finetune == "lora":
            lora = dict(lora or {})
            rank = int(lora.get("rank") or 16)
            out.update(
                lora_rank=rank,
                lora_alpha=float(lora.get("alpha") or rank),
                lora_target_modules=sorted(lora.get("target_modules") or cls.default_lora_targets),
            )
        return out

    def run_identity(self) -> dict:
        hp = self.hparams
        return self.identity(hp.family, hp.pretrained_model_name_or_path, hp.finetune, hp.lora)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Frozen VAE, text encoders and (under LoRA) the base denoiser stay out of .ckpt files.
        keep = set(self.trainable_state_dict())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["tuner_model"] = self.run_identity()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Loading is not strict (frozen weights are not in the file), so check the other direction
        # here: every weight that trains must come back, or the resume would silently start over.
        missing = sorted(set(self.trainable_state_dict()) - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} of this run's trainable weights (e.g. {missing[0]!r}); "
                "was it written with another model.finetune or model.lora setting?"
            )

    def pipeline(self):
        """The family's diffusers pipeline, assembled from the in-memory modules (nothing reloaded)."""
        import diffusers

        scheduler_cls = getattr(diffusers, self.scheduler_config.get("_class_name", "DDPMScheduler"))
        scheduler = scheduler_cls.from_config(self.scheduler_config)
        return self.pipeline_class(scheduler=scheduler, **self.pipeline_components())

    def save_weights(self, directory: str | Path, full_pipeline: bool = True, suffix: str = "") -> Path:
        """Write the trained weights in diffusers format.

        LoRA: ``<dir>/pytorch_lora_weights<suffix>.safetensors``. Full: ``<dir>/pipeline<suffix>/`` (the
        whole pipeline), or ``<dir>/unet<suffix>/`` alone when ``full_pipeline`` is false (checkpoints).
        ``suffix`` names a variant written beside the live weights, such as ``_ema``.
        """
        return _respect_umask(self._save_weights(Path(directory), full_pipeline, suffix))

    def _save_weights(self, directory: Path, full_pipeline: bool, suffix: str) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        if self.hparams.finetune == "lora":
            name = f"pytorch_lora_weights{suffix}.safetensors"
            self.pipeline_class.save_lora_weights(
                directory, **self.lora_layers(), weight_name=name, safe_serialization=True
            )
            return directory / name
        if full_pipeline:
            # The frozen parts are written from the base checkpoint at its own precision, not from the
            # copies cast down for training; only the trained denoiser comes from memory.
            hp = self.hparams
            pipe = self.pipeline_class.from_pretrained(
                hp.pretrained_model_name_or_path,
                unet=self.unet,
                scheduler=self.pipeline().scheduler,
                revision=hp.revision,
                variant=hp.variant,
            )
            pipe.save_pretrained(directory / f"pipeline{suffix}", safe_serialization=True)
            return directory / f"pipeline{suffix}"
        self.unet.save_pretrained(directory / f"unet{suffix}", safe_serialization=True)
        return directory / f"unet{suffix}"


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)  # no /proc: read it by setting it (and put it straight back)
        os.umask(mask)
        return mask


def _respect_umask(path: Path) -> Path:
    """safetensors writes its files 0600 whatever the umask; give them the mode any other file gets, so
    that other users of a shared cluster can read the results."""
    mode = 0o666 & ~_umask()
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        os.chmod(file, mode)
    return path
