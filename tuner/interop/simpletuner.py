"""A SimpleTuner config (config.json, and its multidatabackend.json) as a tuner experiment.

``convert`` reads the SimpleTuner keys (with or without their leading ``--``) and returns an ``Imported``:
the Hydra group choices (on top of the family's preset, so that keys the SimpleTuner config leaves out take
the preset's known-good values), the values, every key it could not carry over with the reason, the
secrets it left out with where they go instead, and the approximations to check. The CLI,
``python -m tuner.import simpletuner`` (tuner/import.py), writes it as a ``# @package _global_`` experiment.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from tuner.interop.simpletuner_common import (  # what the importer's modules share
    Imported,
    SimpleTunerError,
    _bool,
    _file,
    _int,
    _load_json,
    _preset_choice,
    _put,
    _secret_home,
    _side,
    _strip,
    _take_secrets,
    _unwrap,
    expand,
)
from tuner.interop.simpletuner_data import data_section
from tuner.interop.simpletuner_families import model_section, simpletuner_defaults
from tuner.interop.simpletuner_tables import (  # the name tables: SimpleTuner's keys and values -> tuner's
    _OPTIMIZERS,
    GENERIC,
    LOGGERS,
    NEAR_OPTIMIZERS,
    NEAREST_LEVEL,
    OPTIMIZERS,
    REASONS,
    SCHEDULERS,
    SCHEMAS,
)

# ---- run, optimiser, schedule -------------------------------------------------------------------------------
_SAME = {"output_dir": str, "max_train_steps": _int, "num_train_epochs": _int}
_SAME.update(checkpoints_total_limit=_int, gradient_accumulation_steps=_int, max_grad_norm=float)
RUN = {key: (key, convert) for key, convert in _SAME.items()}
RUN |= {  # SimpleTuner key -> (tuner key, converter)
    "checkpoint_step_interval": ("checkpointing_steps", _int),
    "revision": ("model.revision", str),
    "variant": ("model.variant", str),
    "lora_rank": ("model.lora.rank", _int),
    "lora_alpha": ("model.lora.alpha", float),
    "lora_dropout": ("model.lora.dropout", float),
    "use_dora": ("model.lora.use_dora", _bool),
    "gradient_checkpointing": ("model.gradient_checkpointing", _bool),
    "noise_offset": ("model.noise_offset", float),
    "input_perturbation": ("model.input_perturbation", float),
    "prior_loss_weight": ("model.prior_loss_weight", float),
    "train_batch_size": ("data.batch_size", _int),
    "caption_dropout_probability": ("data.caption_dropout_probability", float),
    "aspect_bucket_alignment": ("data.bucket_step", _int),
    "learning_rate": ("optimizer.lr", float),
    "lr_warmup_steps": ("lr_scheduler.warmup_steps", _int),
    "use_ema": ("callbacks.ema.enabled", _bool),
    "ema_decay": ("callbacks.ema.decay", float),
    "ema_update_interval": ("callbacks.ema.update_every_n_steps", _int),
    "validation_step_interval": ("callbacks.validation.every_n_steps", _int),
    "validation_guidance": ("callbacks.validation.guidance_scale", float),
    "validation_num_inference_steps": ("callbacks.validation.num_inference_steps", _int),
    "validation_seed": ("callbacks.validation.seed", _int),
    "validation_negative_prompt": ("callbacks.validation.negative_prompt", str),
    "push_to_hub": ("callbacks.hub.push_to_hub", _bool),
    "hub_model_name": ("callbacks.hub.model_name", str),
    "push_checkpoints_to_hub": ("callbacks.hub.push_checkpoints", _bool),
}


def _run(args: dict, res: Imported) -> None:
    for key in [k for k in RUN if args.get(k) is not None]:
        _put(res, key, RUN[key][0], RUN[key][1], args.pop(key))
    if (res.get("num_train_epochs") or 0) > 0 and "max_train_steps" not in res.values:
        res.set("max_train_steps", None)  # the preset's step count would clash with the epochs
    seed = args.pop("seed", None)
    if seed is not None and str(seed).strip().startswith("-"):
        res.skip("seed", "a random seed per run: tuner always seeds (an exact resume needs it); set one")
    elif seed is not None:
        _put(res, "seed", "seed", _int, seed)
    precision = str(args.pop("mixed_precision", "") or "")
    if precision in ("no", "fp16", "bf16"):
        res.set("mixed_precision", precision)
    elif precision:
        res.skip("mixed_precision", f"{precision!r}: tuner's are no, fp16 and bf16 (fp8: quantise the base model)")
    resume = args.pop("resume_from_checkpoint", None)
    if str(resume) == "latest":
        res.set("resume_from_checkpoint", "latest")
    elif resume:
        res.skip("resume_from_checkpoint", "a SimpleTuner checkpoint cannot resume a tuner run; start fresh")




def _optimizer(args: dict, res: Imported) -> None:
    from tuner.config import optim_schemas

    name = args.pop("optimizer", None)
    if name is not None and str(name).lower() not in OPTIMIZERS:
        res.skip("optimizer", f"{name!r}: tuner's are {', '.join(_OPTIMIZERS)}; the preset's is kept")
    elif name is not None:
        res.defaults["optimizer"] = group = OPTIMIZERS[str(name).lower()]
        if str(name).lower() in NEAR_OPTIMIZERS:
            res.notes.append(f"optimizer={name} -> optimizer={group}: the same update rule, another implementation")
    group = res.defaults.get("optimizer") or _preset_choice(res.defaults["preset"], "optimizer")
    schema = getattr(optim_schemas, SCHEMAS[group])
    fields = [f.name for f in dataclasses.fields(schema) if not f.name.startswith("_")]
    betas = [args.pop(k, None) for k in ("adam_beta1", "adam_beta2")]
    settings = {"weight_decay": args.pop("adam_weight_decay", None), "eps": args.pop("adam_epsilon", None)}
    if any(b is not None for b in betas):  # the one not given: the optimizer's default
        default = getattr(schema(), "betas", [0.9, 0.999])  # (an optimizer without betas reports them below)
        settings["betas"] = [float(b if b is not None else d) for b, d in zip(betas, default, strict=True)]
    for key, value in settings.items():
        if value is not None and key in fields:
            res.set(f"optimizer.{key}", value)
        elif value is not None:
            st_key = {"weight_decay": "adam_weight_decay", "eps": "adam_epsilon"}.get(key, "adam_beta1/2")
            res.skip(st_key, f"optimizer={group} has no {key}; its keys: {', '.join(fields)}")


def _scheduler(args: dict, res: Imported) -> None:
    name = args.pop("lr_scheduler", None)
    if name is not None and str(name) in SCHEDULERS:
        res.defaults["lr_scheduler"] = str(name)
        if name == "sine":
            res.notes.append("lr_scheduler=sine is tuner's own sine (models/lr_schedules.py): compare its shape")
    elif name is not None:
        res.skip("lr_scheduler", f"{name!r}: tuner's are {', '.join(SCHEDULERS)}; the preset's is kept")
    group = res.defaults.get("lr_scheduler") or _preset_choice(res.defaults["preset"], "lr_scheduler")
    takes = {
        "cosine": ["lr_num_cycles"],
        "cosine_with_restarts": ["lr_num_cycles"],
        "polynomial": ["lr_power", "lr_end"],
    }
    for key, tuner_key in (("lr_num_cycles", "num_cycles"), ("lr_power", "power"), ("lr_end", "lr_end")):
        if key in args and key in takes.get(group, []):
            _put(res, key, f"lr_scheduler.{tuner_key}", float, args.pop(key))
        elif key in args:
            res.skip(key, f"lr_scheduler={group} does not take it", args.pop(key))


# ---- quantisation, validation, loggers, webhook -------------------------------------------------------------
def _quantization(args: dict, res: Imported, cls: type) -> None:
    from tuner.config import QUANTIZATION_LEVELS as LEVELS

    def valid(key: str, level: str, encoder: bool) -> bool:
        if level in LEVELS and not (encoder and level == "nf4-bnb"):
            return True
        near = f"; the nearest is {NEAREST_LEVEL[level]}" if level in NEAREST_LEVEL else ""
        res.skip(key, f"{level!r}: tuner's levels are {', '.join(LEVELS)} (nf4-bnb: base model only){near}")
        return False

    base = args.pop("base_model_precision", None)
    if base is not None and valid("base_model_precision", str(base), False):
        res.defaults["quantization"] = "none" if str(base) == "no_change" else str(base)
    for key in sorted(k for k in args if re.fullmatch(r"text_encoder_\d+_precision", k)):
        level, number = str(args.pop(key)), int(key.split("_")[2])
        name = "text_encoder" if number == 1 else f"text_encoder_{number}"  # diffusers' component names
        if name not in cls.text_encoder_names():
            res.skip(key, f"{res.defaults['model']} has no {name}", None if level == "no_change" else level)
        elif valid(key, level, True):
            res.set(f"quantization.text_encoders.{name}", level)


def _validation(args: dict, res: Imported, dirs: list[Path]) -> None:
    prompt, library = args.pop("validation_prompt", None), args.pop("user_prompt_library", None)
    if prompt:
        res.set("callbacks.validation.prompts", [str(prompt)])
    if library:
        res.set("callbacks.validation.prompt_library", _file(res, "user_prompt_library", library, dirs))
    if prompt or library:
        res.set("callbacks.validation.enabled", True)
    if args.get("validation_resolution"):
        _put(res, "validation_resolution", "callbacks.validation.resolution", _side, args.pop("validation_resolution"))
    modes = {"none": "live", "ema_only": "ema", "comparison": "both"}
    mode = args.pop("ema_validation", None)
    if mode is not None and str(mode) in modes:
        res.set("callbacks.validation.use_ema", modes[str(mode)])
    elif mode is not None:
        res.skip("ema_validation", f"{mode!r}: tuner's are {', '.join(modes)}")
    if args.get("ema_device") is not None:
        res.set("callbacks.ema.on_cpu", str(args.pop("ema_device")) == "cpu")
    if _bool(args.pop("ema_cpu_only", False)):  # the EMA weights kept on the CPU
        res.set("callbacks.ema.on_cpu", True)


def _logger(args: dict, res: Imported) -> None:
    report = str(args.pop("report_to", "") or "").lower()
    if report in LOGGERS:
        res.defaults["logger"] = report
    elif report:
        res.skip("report_to", f"{report!r}: tuner logs to {', '.join(LOGGERS)} (and csv, its default)")
    for key, name in (("tracker_project_name", "project"), ("tracker_run_name", "name")):
        if key in args and report == "wandb":
            res.set(f"logger.{name}", str(args.pop(key)))
        elif key in args:
            res.skip(key, "only report_to=wandb takes a project and run name", args.pop(key))


def _webhook(args: dict, res: Imported, dirs: list[Path]) -> None:
    value = args.pop("webhook_config", None)
    if isinstance(value, str) and value.strip() and not value.lstrip().startswith(("{", "[")):
        res.set("callbacks.webhook.config", _file(res, "webhook_config", value, dirs))
    elif value:
        res.secrets.append(
            ("webhook_config", "inline webhook settings (with their URL): " + _secret_home("webhook", ""))
        )


# ---- the family's objective ---------------------------------------------------------------------------------
OBJECTIVE = {  # key -> (tuner key, converter, what it needs: a noise schedule, or a field of model.options)
    "flow_schedule_shift": ("model.flow_shift", float, "flow"),
    "flow_sigmoid_scale": ("model.logit_std", float, "flow"),  # sigmoid(scale * N(0, 1)) is logit-normal(0, scale)
    "snr_gamma": ("model.min_snr_gamma", float, "ddpm"),
    "prediction_type": ("model.prediction_type", str, "ddpm"),
    "rescale_betas_zero_snr": ("model.zero_terminal_snr", _bool, "ddpm"),
    "flux_guidance_value": ("model.options.guidance", float, "guidance"),
    "tokenizer_max_length": ("model.options.t5_max_length", _int, "t5_max_length"),
}


def _objective(args: dict, res: Imported, cls: type) -> None:
    family, schedule = res.defaults["model"], cls.noise_schedule
    options = [f.name for f in dataclasses.fields(cls.Options)]
    for key, (path, convert, needs) in [(k, v) for k, v in OBJECTIVE.items() if k in args]:
        value = args.pop(key)
        if needs in ("flow", "ddpm") and needs != schedule:
            res.skip(key, f"{family} trains with {schedule} noise; {key} is for {needs} families", value)
        elif needs not in ("flow", "ddpm") and needs not in options:
            res.skip(key, f"{family} has no model.options.{needs}", value)
        elif key == "prediction_type" and value not in ("epsilon", "v_prediction"):
            res.skip(key, f"{value!r}: tuner's are epsilon and v_prediction")
        else:
            _put(res, key, path, convert, value)
    if res.get("model.logit_std") is not None:
        res.set("model.timestep_sampling", "logit_normal")
    if schedule == "flow" and _bool(args.pop("flow_use_uniform_schedule", False)):
        res.set("model.timestep_sampling", "uniform")
    if args.get("flux_guidance_mode") in (None, "constant"):
        args.pop("flux_guidance_mode", None)  # tuner trains at the one guidance value too
    target = args.pop("flux_lora_target", None)
    if target in ("all", "all+ffs") and "attention+ffn" in cls.lora_target_presets:
        if target == "all+ffs":  # attention and feed-forward layers
            res.set("model.lora.target_modules", ["attention+ffn"])
    elif target is not None:
        why = (
            "tuner's are the family's default (attention), [attention+ffn], [all] or names (model.lora.target_modules)"
        )
        res.skip("flux_lora_target", f"{target!r}: {why}")


# ---- the whole config ---------------------------------------------------------------------------------------
def convert(config: str | Path, backend: str | Path | None = None) -> Imported:
    """A SimpleTuner config.json (and its multidatabackend.json) as a tuner experiment."""
    config = Path(config)
    args = _unwrap(_load_json(config, "SimpleTuner config"))
    if not isinstance(args, dict):
        raise SimpleTunerError(f"{config}: a SimpleTuner config is a JSON object of options")
    args, res = expand(_strip(args), {}), Imported(sources=[str(config)])
    given = set(args)
    here = config.parent.resolve()
    dirs = [Path.cwd(), here, *here.parents[:3]]  # SimpleTuner runs from its root, the config somewhere below it
    _take_secrets(args, res, "")
    cls = model_section(args, res, dirs)
    try:
        _run(args, res)
        _optimizer(args, res)
        _scheduler(args, res)
        _quantization(args, res, cls)
        _validation(args, res, dirs)
        _logger(args, res)
        _webhook(args, res, dirs)
        _objective(args, res, cls)
        data_section(args, res, dirs, str(backend) if backend else None)
        simpletuner_defaults(given, res)
    except SimpleTunerError:
        raise
    except (TypeError, ValueError) as err:  # a value the tables' converters do not see, e.g. a flag that is no flag
        raise SimpleTunerError(f"{config}: a value cannot be read: {err}") from None
    for key, value in args.items():
        res.skip(key, REASONS.get(key, GENERIC), value)
    return res
