"""Typed schemas for every config group, registered in Hydra's ConfigStore.

The YAML files in conf/ are merged onto these dataclasses, so a misspelled key, a wrong type or an
unknown enum value fails while the config is composed, before any weights load. ``check`` adds the
rules that span keys. Nothing here imports torch or the model stack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from datamodules.spec import CaptionStrategy, DatasetKeys, DatasetOverrides
from tuner.config.hints import suggest, unknown_key_hint  # noqa: F401 - unknown_key_hint re-exported (train.py)
from tuner.config.model_schemas import (  # noqa: F401 - re-exported: the model group's schema
    Expert,
    Experts,
    Finetune,
    LoraConfig,
    LossWeighting,
    LycorisAlgo,
    LycorisConfig,
    ModelConfig,
    PredictionType,
    TimestepSampling,
)
from tuner.config.optim_schemas import (
    AdafactorConfig,
    Adam8bitConfig,
    AdamWConfig,
    CosineSchedulerConfig,
    LionConfig,
    LRSchedulerConfig,
    PolynomialSchedulerConfig,
    ProdigyConfig,
    SineSchedulerConfig,
    StableAdamWConfig,
    optim_problems,
)


class OnNonFinite(Enum):
    stop = "stop"
    skip = "skip"


class MixedPrecision(Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


@dataclass
class DataConfig(DatasetKeys):
    """``data``: every dataset key (datamodules/spec.py) as the default for ``datasets.<id>``, plus these."""

    _target_: str = "datamodules.DiffusionDataModule"
    _convert_: str = "all"
    batch_size: int = 1
    caption_dropout_probability: float = 0.1
    cache_dir: Optional[str] = None  # scan, latent, text-embedding and download caches; null: <output_dir>/cache
    validation_split: float = 0.0  # share of images held out of training for callbacks.validation's loss
    cache_latents: bool = True  # VAE posteriors on disk (off by itself for random-crop data)
    cache_text_embeds: bool = True
    num_workers: int = 0
    allow_large_buckets: bool = False  # confirm buckets over 16 megapixels (refused otherwise, before loading)
    allow_upscale: bool = False  # confirm buckets that enlarge the median image more than 4x (refused otherwise)
    # Entries are checked against DatasetOverrides in ``check`` (OmegaConf cannot add new typed entries to a
    # Dict[str, DatasetOverrides] from the command line, e.g. ``+data.datasets.photos.path=DIR``).
    datasets: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantizationConfig:
    base_model_precision: str = "no_change"
    text_encoder_precision: str = "no_change"  # every text encoder, unless text_encoders.<name> says otherwise
    text_encoders: dict[str, str] = field(default_factory=dict)  # per encoder, by name: {text_encoder_3: int8-quanto}
    text_encoder_2_precision: Optional[str] = None  # deprecated alias of text_encoders.text_encoder_2


@dataclass
class TrainerConfig:
    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: Any = "auto"
    plugins: Any = None  # e.g. Lightning's SLURMEnvironment (trainer=slurm)
    log_every_n_steps: int = 1
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    deterministic: bool = False
    benchmark: bool = False


class UseEMA(Enum):
    live = "live"
    ema = "ema"
    both = "both"


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.995  # SimpleTuner's default
    warmup: bool = True  # decay ramps as (1 + step) / (10 + step) up to `decay`
    update_every_n_steps: int = 1
    on_cpu: bool = False  # keep the shadow weights in system memory


@dataclass
class ValidationConfig:
    enabled: bool = False
    every_n_steps: Optional[int] = None  # null: only at the end
    prompts: list[str] = field(default_factory=list)
    prompt_library: Optional[str] = None  # a JSON file {shortname: prompt}
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    num_inference_steps: int = 25
    resolution: Optional[int] = None  # square side in pixels; null: data.resolution (as an edge)
    seed: int = 42
    use_ema: UseEMA = UseEMA.both  # with callbacks.ema.enabled: sample the EMA weights, the live ones, or both
    loss_batches: int = 4  # validation loss: this many fixed batches...
    loss_levels: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # ...at these noise levels
    loss_timesteps: Optional[list[int]] = None  # DDPM alias of loss_levels, in timesteps (0..T-1 of the schedule)
    inputs: list[str] = field(default_factory=list)  # an edit model's input image for each prompt (paths, in order)
    fps: Optional[float] = None  # a video family's clips are written at it; null: data.frame_rate, else 16


@dataclass
class WebhookSettings:
    config: Optional[str] = None  # path to the seed's webhook JSON (webhook_url, webhook_type, ...); null: off
    status_every_n_steps: int = 100
    exit_timeout: float = 2.0  # seconds the run waits at exit for undelivered messages (then drops them)


@dataclass
class HubConfig:
    push_to_hub: bool = False
    model_name: Optional[str] = None  # the seed's hub_model_name
    push_checkpoints: bool = True  # the seed's push_checkpoints_to_hub
    private: bool = False
    endpoint: Optional[str] = None  # a Hub mirror; the token comes from the environment or `hf auth login`
    license: Optional[str] = None  # for the model card; null: the family's base model license


@dataclass
class ProgressConfig:
    # null: plain lines when stdout is not a terminal (a file, SLURM, nohup), the step bar when it is;
    # true / false: always the lines / always the bar. trainer.enable_progress_bar=false turns both off.
    plain: Optional[bool] = None
    every_s: float = 30.0  # plain lines: at most one every this many seconds...
    every_percent: float = 1.0  # ...and every this many percent of the steps, whichever is rarer; plus the last


@dataclass
class CallbacksConfig:
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    hub: HubConfig = field(default_factory=HubConfig)
    # any other Lightning callback, by name: +callbacks.extra.NAME._target_=dotted.Class (+ its arguments)
    extra: dict[str, Any] = field(default_factory=dict)


class LoraFormat(Enum):
    diffusers = "diffusers"  # pytorch_lora_weights.safetensors: diffusers, and ComfyUI for the DiT families
    kohya = "kohya"  # <name>.safetensors, lora_unet_* keys + ss_* metadata: A1111/Forge, ComfyUI, CivitAI


@dataclass
class ExportConfig:
    lora_formats: list[LoraFormat] = field(default_factory=lambda: [LoraFormat.diffusers])
    name: Optional[str] = None  # the kohya file's name; null: the output_dir's folder name


@dataclass
class TrainConfig:
    seed: int = 42
    output_dir: str = MISSING
    max_train_steps: Optional[int] = None
    num_train_epochs: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None  # "latest" or a path
    checkpointing_steps: Optional[int] = 500
    checkpoints_total_limit: Optional[int] = None
    mixed_precision: MixedPrecision = MixedPrecision.no
    gradient_accumulation_steps: int = 1
    max_grad_norm: Optional[float] = 1.0
    on_nonfinite: OnNonFinite = OnNonFinite.stop  # a step with a NaN/inf loss or gradient: stop the run, or skip it
    max_nonfinite_skips: int = 10  # on_nonfinite=skip: stop after this many dropped steps in a row
    demo_assets_dir: Optional[str] = None  # where the tiny demo's pipeline and images are written
    model: ModelConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: Any = MISSING
    lr_scheduler: Any = MISSING
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logger: Any = None


# models.quantize.LEVELS, repeated here so that checking a config imports no model code
QUANTIZATION_LEVELS = ("no_change", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "nf4-bnb")


def _run_id() -> str:
    # Kept in the environment so that DDP workers, which Lightning starts as new processes of the
    # same command, resolve the same default output_dir as the process that launched them.
    return os.environ.setdefault("TUNER_RUN_ID", datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))


def register() -> None:
    if not OmegaConf.has_resolver("tuner_run_id"):
        OmegaConf.register_new_resolver("tuner_run_id", _run_id)
    cs = ConfigStore.instance()
    # The root schema types model, data, trainer, quantization and callbacks. Groups whose options differ
    # in keys (optimizers, schedules) pull their own schema in with `/schema/<group>/<name>@_here_`.
    cs.store(name="train_schema", node=TrainConfig)
    for name, node in (
        ("adamw", AdamWConfig),
        ("adam8bit", Adam8bitConfig),
        ("lion", LionConfig),
        ("stableadamw", StableAdamWConfig),
        ("prodigy", ProdigyConfig),
        ("adafactor", AdafactorConfig),
    ):
        cs.store(group="schema/optimizer", name=name, node=node)
    cs.store(group="schema/lr_scheduler", name="base", node=LRSchedulerConfig)
    cs.store(group="schema/lr_scheduler", name="cosine", node=CosineSchedulerConfig)
    cs.store(group="schema/lr_scheduler", name="polynomial", node=PolynomialSchedulerConfig)
    cs.store(group="schema/lr_scheduler", name="sine", node=SineSchedulerConfig)


class ConfigError(ValueError):
    """A config that cannot run; raised before any weights load."""


def _unset(value: Optional[int]) -> bool:
    return value is None or value <= 0  # the seed's convention: 0 means "not this one"


def _typed_datasets(cfg: DictConfig) -> dict[str, DictConfig]:
    """Each ``data.datasets.<id>`` merged onto the DatasetOverrides schema: unknown keys and bad values fail."""
    from omegaconf.errors import OmegaConfBaseException

    typed = {}
    valid = [f for f in DatasetOverrides.__dataclass_fields__]
    for name, entry in cfg.data.datasets.items():
        if not isinstance(entry, DictConfig):
            raise ConfigError(f"data.datasets.{name} must be a mapping of dataset keys ({', '.join(valid)})")
        for key in entry:
            if key not in valid:
                raise ConfigError(f"unknown config key 'data.datasets.{name}.{key}'.{suggest(str(key), valid)}")
        try:
            typed[name] = OmegaConf.merge(OmegaConf.structured(DatasetOverrides), entry)
        except OmegaConfBaseException as err:
            raise ConfigError(f"data.datasets.{name}: {err}".splitlines()[0]) from err
    return typed


def check(cfg: DictConfig, require_steps: bool = True) -> None:
    """Rules that span keys. Raises ConfigError naming the keys and the valid values."""
    datasets = _typed_datasets(cfg)
    _check_run(cfg, require_steps)
    _check_noise_range(cfg.model)
    _check_adapter(cfg.model)
    _check_data(cfg, datasets)
    _check_callbacks(cfg.callbacks)
    _check_quantization(cfg)
    _check_weight_dtype(cfg)
    problems = optim_problems(cfg.optimizer, cfg.lr_scheduler, cfg.max_train_steps)
    if problems:
        raise ConfigError(problems[0])
    _check_bucket_size(cfg, datasets)


def _check_weight_dtype(cfg: DictConfig) -> None:
    """bf16 trained weights compute under bf16 autocast; stochastic rounding rounds bf16 weights only."""
    weights = str(getattr(cfg.model.weight_dtype, "value", cfg.model.weight_dtype))
    if weights == "bf16" and str(getattr(cfg.mixed_precision, "value", cfg.mixed_precision)) != "bf16":
        raise ConfigError(f"model.weight_dtype=bf16 needs mixed_precision=bf16 (it is {cfg.mixed_precision})")
    if cfg.optimizer.get("stochastic_rounding") and weights != "bf16":
        raise ConfigError(
            "optimizer.stochastic_rounding rounds bf16 weights, and model.weight_dtype=fp32: set model.weight_dtype=bf16 "
            "(with mixed_precision=bf16), or leave stochastic_rounding off"
        )


def _check_run(cfg: DictConfig, require_steps: bool) -> None:
    steps, epochs = cfg.max_train_steps, cfg.num_train_epochs
    for key, value in (("max_train_steps", steps), ("num_train_epochs", epochs)):
        if value is not None and value < 0:
            raise ConfigError(f"{key}={value}; it must be a positive number (or 0/null to leave it unset)")
    if not _unset(steps) and not _unset(epochs):
        raise ConfigError(
            f"max_train_steps={steps} and num_train_epochs={epochs} are both set; set one and leave the other "
            "at 0 or null (e.g. num_train_epochs=0)"
        )
    if require_steps and _unset(steps) and _unset(epochs):
        raise ConfigError(
            "neither max_train_steps nor num_train_epochs is set; set one of them (e.g. max_train_steps=1000)"
        )
    if cfg.gradient_accumulation_steps < 1:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}; it must be >= 1")
    if cfg.max_nonfinite_skips < 1:
        raise ConfigError(f"max_nonfinite_skips={cfg.max_nonfinite_skips}; it must be >= 1 (e.g. 10)")
    if cfg.checkpointing_steps is not None and cfg.checkpointing_steps < 0:
        raise ConfigError(f"checkpointing_steps={cfg.checkpointing_steps}; use a positive number, or 0/null for none")


def _check_adapter(model: DictConfig) -> None:
    """The adapter's size: a rank of 0 used to train at 16 (``rank or 16``) without a word."""
    for name in ("lora", "lycoris"):
        settings = model.get(name)
        if settings is None:
            continue
        if settings.rank is None or settings.rank < 1:
            raise ConfigError(f"model.{name}.rank={settings.rank}; it must be >= 1 (e.g. 16)")
        if settings.alpha is not None and not settings.alpha > 0:
            raise ConfigError(f"model.{name}.alpha={settings.alpha}; it must be > 0, or null for alpha = rank")
        if not 0 <= settings.dropout < 1:
            raise ConfigError(f"model.{name}.dropout={settings.dropout}; valid: 0 up to, not including, 1")
    lora, finetune = model.get("lora"), getattr(model.get("finetune"), "value", model.get("finetune"))
    if lora is None:
        return
    shaping = [k for k in ("use_dora", "plus_ratio", "text_encoders") if lora.get(k) not in (None, False, [])]
    if shaping and finetune != "lora":
        raise ConfigError(f"model.lora.{shaping[0]} shapes a LoRA, and model.finetune={finetune}: set model.finetune=lora")
    for key in ("text_encoder_lr", "text_encoder_target_modules"):
        if lora.get(key) is not None and not lora.get("text_encoders"):
            raise ConfigError(f"model.lora.{key} is for the text encoders' LoRA: set model.lora.text_encoders too")
    for key, usual in (("plus_ratio", "16 is usual), or null for off"), ("text_encoder_lr", "e.g. 5e-5), or null for optimizer.lr")):
        if lora.get(key) is not None and not lora[key] > 0:
            raise ConfigError(f"model.lora.{key}={lora[key]}; it must be > 0 ({usual}")


def _check_data(cfg: DictConfig, datasets: dict[str, DictConfig]) -> None:
    data = cfg.data
    if not data.path and not any(d.path for d in datasets.values()):
        raise ConfigError("data.path is not set: point it at a folder of images (or set data.datasets.<id>.path)")
    for name, d in [("data", data), *((f"data.datasets.{k}", v) for k, v in datasets.items())]:
        if d.repeats is not None and d.repeats < 0:
            raise ConfigError(f"{name}.repeats={d.repeats}; it must be >= 0")
        if d.probability is not None and not 0 < d.probability <= 1:
            raise ConfigError(f"{name}.probability={d.probability}; valid: above 0, up to 1")
        if d.maximum_image_size is not None and (d.target_downsample_size or data.target_downsample_size) is None:
            raise ConfigError(
                f"{name}.maximum_image_size needs {name}.target_downsample_size (the size to bring them to)"
            )
    if data.batch_size < 1:
        raise ConfigError(f"data.batch_size={data.batch_size}; it must be >= 1")
    if not 0 <= data.validation_split < 1:
        raise ConfigError(f"data.validation_split={data.validation_split}; valid: 0 (none) up to, not including, 1")
    if not 0 <= data.caption_dropout_probability <= 1:
        raise ConfigError(f"data.caption_dropout_probability={data.caption_dropout_probability}; valid: 0 to 1")
    strategies = [d.caption_strategy for d in datasets.values()] + [data.caption_strategy]
    prompts = [d.instance_prompt for d in datasets.values()] + [data.instance_prompt]
    if CaptionStrategy.instanceprompt in strategies and not any(prompts):
        raise ConfigError("caption_strategy=instanceprompt needs data.instance_prompt")


def _check_callbacks(callbacks: DictConfig) -> None:
    progress = callbacks.progress
    if progress.every_s < 0:
        raise ConfigError(f"callbacks.progress.every_s={progress.every_s}; it must be 0 or more (seconds)")
    if not 0 <= progress.every_percent <= 100:
        raise ConfigError(f"callbacks.progress.every_percent={progress.every_percent}; it must be between 0 and 100")
    ema = callbacks.ema
    if ema.enabled and not 0 < ema.decay < 1:
        raise ConfigError(f"callbacks.ema.decay={ema.decay}; it must be between 0 and 1 (e.g. 0.995)")
    hook = callbacks.webhook
    if hook.config and not os.path.isfile(hook.config):
        raise ConfigError(f"callbacks.webhook.config={hook.config!r} is not a file")
    if callbacks.hub.push_to_hub and not callbacks.hub.model_name:
        raise ConfigError("callbacks.hub.push_to_hub=true needs callbacks.hub.model_name (the repository name)")
    val = callbacks.validation
    if val.prompt_library and not os.path.isfile(val.prompt_library):
        raise ConfigError(f"callbacks.validation.prompt_library={val.prompt_library!r} is not a file")
    if val.inputs and not val.prompt_library and len(val.inputs) != len(val.prompts):
        raise ConfigError(
            f"callbacks.validation.inputs lists {len(val.inputs)} images for {len(val.prompts)} prompts: give one "
            "input image per prompt, in the prompts' order"
        )
    for name, spec in callbacks.extra.items():
        _check_extra_callback(f"callbacks.extra.{name}", spec)


def _check_extra_callback(key: str, spec: Any) -> None:
    """A user's own callback: a ``_target_`` that imports and is a Lightning callback (checked, not built)."""
    from hydra.utils import get_class

    target = spec.get("_target_") if isinstance(spec, DictConfig) else None
    if not target:
        raise ConfigError(f"{key} needs a _target_: the dotted path of a Lightning callback class")
    try:
        cls = get_class(target)
    except Exception as err:  # noqa: BLE001 - Hydra wraps import failures of every kind
        raise ConfigError(f"{key}._target_={target}: cannot import it ({str(err).splitlines()[0]})") from None
    import lightning as L

    if not (isinstance(cls, type) and issubclass(cls, L.Callback)):
        raise ConfigError(f"{key}._target_={target} is not a Lightning callback (lightning.pytorch.Callback)")


def _check_quantization(cfg: DictConfig) -> None:
    quant = cfg.quantization
    levels = {k: quant[k] for k in ("base_model_precision", "text_encoder_precision", "text_encoder_2_precision")}
    levels.update({f"text_encoders.{k}": v for k, v in quant.text_encoders.items()})
    for key, value in levels.items():
        if value is not None and value not in QUANTIZATION_LEVELS:
            raise ConfigError(f"quantization.{key}={value!r}; valid: {', '.join(QUANTIZATION_LEVELS)}")
    encoder_levels = {k: v for k, v in levels.items() if k != "base_model_precision"}
    for key, value in encoder_levels.items():
        if value == "nf4-bnb":
            raise ConfigError(
                f"quantization.{key}=nf4-bnb: nf4 applies to the denoiser (base_model_precision) only; quantise "
                "text encoders with int8-quanto or int4-quanto"
            )
    if cfg.model.finetune == Finetune.lycoris and quant.base_model_precision != "no_change":
        raise ConfigError(
            f"model.finetune=lycoris with quantization.base_model_precision={quant.base_model_precision}: LyCORIS "
            "wraps plain layers only; train a LoRA on a quantised denoiser (model.finetune=lora) or use quantization=none"
        )
    if cfg.model.finetune == Finetune.full and quant.base_model_precision != "no_change":
        raise ConfigError(
            f"model.finetune=full with quantization.base_model_precision={quant.base_model_precision}: "
            "a quantised denoiser cannot be fully fine-tuned; train a LoRA on it (model.finetune=lora) or use "
            "quantization=none"
        )


def _check_noise_range(model: DictConfig) -> None:
    lo, hi = model.min_noise_level, model.max_noise_level
    if not 0 <= lo < hi <= 1:
        raise ConfigError(
            f"model.min_noise_level={lo}, model.max_noise_level={hi}; need 0 <= min_noise_level < max_noise_level <= 1 "
            "(fractions of the noise schedule)"
        )
    if model.expert is not None:
        if not 0 < model.expert_boundary < 1:
            raise ConfigError(f"model.expert_boundary={model.expert_boundary}; valid: between 0 and 1 (e.g. 0.35)")
        if model.min_timestep is not None or model.max_timestep is not None:
            raise ConfigError("model.expert with model.min_timestep/max_timestep: give the range as noise levels only")
        low = model.expert == Expert.low_noise
        if (low and lo >= model.expert_boundary) or (not low and hi <= model.expert_boundary):
            raise ConfigError(
                f"model.expert={model.expert.name} at model.expert_boundary={model.expert_boundary} leaves no noise "
                f"range inside model.min_noise_level={lo}..max_noise_level={hi}"
            )
    t_lo, t_hi = model.min_timestep, model.max_timestep
    if (t_lo is not None and t_lo < 0) or (t_lo is not None and t_hi is not None and t_hi <= t_lo):
        raise ConfigError(
            f"model.min_timestep={t_lo}, model.max_timestep={t_hi}; need 0 <= min_timestep < max_timestep (<= the "
            "schedule's train timesteps: 1000 for SD, 1100 for Kolors), or use model.min_noise_level/max_noise_level (0..1)"
        )


MAX_BUCKET_MEGAPIXELS = 16


def bucket_megapixels(resolution: float, resolution_type: str) -> float:
    """The area of a square bucket at this resolution, in megapixels (``pixel``: the shorter edge)."""
    if str(resolution_type) in ("area", "ResolutionType.area") and resolution < 16:
        return float(resolution)  # below 16, an area resolution is in megapixels
    return resolution**2 / 1e6


def _check_bucket_size(cfg: DictConfig, datasets: dict[str, DictConfig]) -> None:
    """Buckets over 16 megapixels are almost always a unit mistake (``resolution=7`` meant as 768 px is
    7 MP): refused unless ``data.allow_large_buckets=true`` confirms them."""
    if cfg.data.allow_large_buckets:
        return
    entries = [("data", cfg.data)] + [(f"data.datasets.{k}", v) for k, v in datasets.items()]
    for name, d in entries:
        resolution = d.resolution if d.resolution is not None else cfg.data.resolution
        kind = d.resolution_type if d.resolution_type is not None else cfg.data.resolution_type
        kind = kind.name if isinstance(kind, Enum) else str(kind)
        mp = bucket_megapixels(resolution, kind)
        if mp > MAX_BUCKET_MEGAPIXELS:
            raise ConfigError(
                f"{name}.resolution={resolution:g} ({kind}) makes {mp:.0f}-megapixel buckets; resolution is an edge "
                f"in pixels (e.g. 1024) or, below 16 with resolution_type=area, megapixels (e.g. 1). If you really "
                f"mean it, add data.allow_large_buckets=true"
            )
