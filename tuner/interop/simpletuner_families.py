"""The model side of the SimpleTuner import (tuner/interop/simpletuner.py): model_family, model_flavour and model_type as
tuner's family, preset and base model, the adapter (LoRA, LyCORIS, the assistant LoRA) and the refiner expert;
settings that would make tuner train something else are refused. ``simpletuner_defaults`` then puts SimpleTuner's
own defaults where the config leaves a key out and the preset's value differs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from tuner.interop.simpletuner_common import (
    CONF,
    Imported,
    SimpleTunerError,
    _bool,
    _int,
    _load_json,
    _locate,
    _preset_choice,
    _put,
    tried,
)
from tuner.interop.simpletuner_tables import (
    DEFAULT_FLAVOUR,
    FAMILIES,
    FLAVOURS,
    GENERIC,
    OTHER_FLAVOURS,
    REFUSED_KEYS,
    assistant_adapter,
    family_and_preset,
)


def model_section(args: dict, res: Imported, dirs: list[Path]) -> type:
    """model_family, model_flavour, model_type and the adapter keys -> the preset, ``model`` and its class."""
    _refuse(args)
    st_family = str(args.pop("model_family", "") or "").lower()
    res.placeholders["model_family"] = st_family
    if st_family not in FAMILIES:
        given = f"model_family={st_family!r}" if st_family else "model_family is not set"
        raise SimpleTunerError(f"{given}; tuner trains: {', '.join(FAMILIES)}")
    path = args.pop("pretrained_model_name_or_path", None)
    flavour = _flavour(st_family, str(args.pop("model_flavour", "") or ""), path)
    model_type = str(args.pop("model_type", "") or "").lower()
    family, preset = family_and_preset(st_family, str(path or ""), flavour, model_type)
    res.defaults.update(preset=preset, model=family)
    path = path or FLAVOURS.get((st_family, flavour.lower()))
    if path:
        res.set("model.pretrained_model_name_or_path", _locate(path, dirs[:1]) or str(path))
    finetune = _finetune(model_type, str(args.pop("lora_type", "") or "").lower(), res)
    if finetune:
        res.set("model.finetune", finetune)
    if finetune == "lycoris":
        _lycoris(args.pop("lycoris_config", None), res, dirs)
    _expert(args, res)
    from tuner.config.families import family_class

    cls = family_class(family)
    _assistant(args, res, cls, st_family, flavour, dirs)
    _text_encoders(args, res, cls, family)
    return cls


def _text_encoders(args: dict, res: Imported, cls: type, family: str) -> None:
    """train_text_encoder: a LoRA on every text encoder the family's pipeline loads one into."""
    value, lr = args.pop("train_text_encoder", None), args.pop("text_encoder_lr", None)
    if value is None or not _on(value):
        if lr is not None:
            res.skip("text_encoder_lr", "the text encoders' rate, and train_text_encoder is off")
        return
    if not cls.text_encoder_lora_targets:
        res.skip("train_text_encoder", f"{family}'s pipeline loads no text-encoder LoRA; the denoiser's LoRA trains alone")
        return
    res.set("model.lora.text_encoders", list(cls.text_encoder_lora_targets))
    if lr is not None:
        res.set("model.lora.text_encoder_lr", float(lr))


def _refuse(args: dict) -> None:
    """A setting that changes what is trained and that tuner cannot carry: no experiment, rather than another run."""
    for key, why in REFUSED_KEYS.items():
        if key in args and _on(args[key]):
            raise SimpleTunerError(f"{key}={args[key]!r}: {why}; not imported (the run would train something else)")


def _on(value: Any) -> bool:
    try:
        return _bool(value)
    except ValueError:
        return True  # a value that is no flag (a path, a name) sets it too


def _flavour(st_family: str, flavour: str, path: Any) -> str:
    """The flavour SimpleTuner trains (its default when the config names neither flavour nor path); refused when
    tuner's family would train something else."""
    if not flavour and not path:
        return DEFAULT_FLAVOUR.get(st_family, "")
    key = (st_family, flavour.lower())
    if key in OTHER_FLAVOURS:
        raise SimpleTunerError(f"model_flavour={flavour!r} ({st_family}): {OTHER_FLAVOURS[key]}; not imported")
    if flavour and key not in FLAVOURS:
        known = sorted(f for fam, f in FLAVOURS if fam == st_family and f)
        raise SimpleTunerError(
            f"model_flavour={flavour!r}: not a {st_family} flavour tuner trains; its are: {', '.join(known) or 'none'}"
        )
    return flavour


def _expert(args: dict, res: Imported) -> None:
    """SimpleTuner's refiner keys: one split-schedule expert (the refiner is the low-noise one) -> ``model.expert``;
    a preset that trains both (wan22-a14b's model.experts) then trains that one alone."""
    if not _bool(args.pop("refiner_training", False)):
        return
    invert = _bool(args.pop("refiner_training_invert_schedule", False))
    res.set("model.expert", "high_noise" if invert else "low_noise")
    if res.defaults["preset"] == "wan22-a14b":
        res.set("model.experts", None)
    if args.get("refiner_training_strength") is not None:
        _put(res, "refiner_training_strength", "model.expert_boundary", float, args.pop("refiner_training_strength"))


def _assistant(args: dict, res: Imported, cls: type, st_family: str, flavour: str, dirs: list[Path]) -> None:
    """SimpleTuner's assistant LoRA (a de-distilling adapter active while training: Flux schnell, Z-Image-Turbo's
    flavours, on by default there) -> ``model.options.training_adapter``."""
    path, weight = args.pop("assistant_lora_path", None), args.pop("assistant_lora_weight_name", None)
    disabled = _bool(args.pop("disable_assistant_lora", False))
    if "training_adapter" not in {f.name for f in dataclasses.fields(cls.Options)}:
        if path:
            res.skip("assistant_lora_path", f"{cls.__name__} has no training adapter in tuner")
        return
    path = (_locate(path, dirs) or str(path)) if path else ""  # a local one, as SimpleTuner's root sees it
    spec = None if disabled else assistant_adapter(st_family, flavour, path, str(weight or ""))
    if spec or disabled:
        res.set("model.options.training_adapter", spec)


def _finetune(model_type: str, lora_type: str, res: Imported) -> str | None:
    if "lycoris" in (lora_type, model_type):
        return "lycoris"
    if lora_type not in ("", "standard"):
        raise SimpleTunerError(f"lora_type={lora_type!r}: tuner's adapters are standard LoRA and lycoris; not imported")
    if "lora" in model_type:
        return "lora"
    if model_type in ("full", "deepfloyd-full", "deepfloyd-stage2"):
        return "full"
    if model_type:
        raise SimpleTunerError(f"model_type={model_type!r}: tuner's are lora, lycoris and full; not imported")
    else:
        res.notes.append("model_type is not set: the preset's model.finetune is kept")
    return None


LYCORIS = {"algo": ("algo", str), "linear_dim": ("rank", _int), "linear_alpha": ("alpha", float)}
LYCORIS.update(factor=("factor", _int), dropout=("dropout", float))


def _lycoris(path: Any, res: Imported, dirs: list[Path]) -> None:
    found = _locate(path, dirs) if path else None
    if not path:
        res.notes.append("lycoris_config is not set: model.lycoris keeps tuner's defaults (lokr, factor 16)")
        return
    if not found:
        where = ", ".join(str(p) for p in tried(path, dirs))
        raise SimpleTunerError(f"lycoris_config={path!r} is not found; tried: {where}")
    res.sources.append(found)
    for key, value in _load_json(Path(found), "lycoris config").items():
        if key == "algo" and value not in ("lokr", "loha"):
            res.skip("lycoris_config.algo", f"{value!r}: tuner's are lokr and loha")
        elif key in LYCORIS:
            _put(res, f"lycoris_config.{key}", f"model.lycoris.{LYCORIS[key][0]}", LYCORIS[key][1], value)
        elif key != "multiplier" or str(value) not in ("1", "1.0"):  # 1.0: the strength tuner trains at
            why = "the adapter targets the family's LoRA modules" if key == "apply_preset" else GENERIC
            res.skip(f"lycoris_config.{key}", why)


# ---- SimpleTuner's defaults over the preset's ---------------------------------------------------------------
ST_DEFAULTS = {"lr_warmup_steps": ("lr_scheduler.warmup_steps", 0)}  # key -> (tuner key, SimpleTuner's default)
ST_DEFAULTS["lora_rank"] = ("model.lora.rank", 16)


def _preset_value(preset: str, path: str) -> Any:
    node: Any = yaml.safe_load((CONF / "preset" / f"{preset}.yaml").read_text()) or {}
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def simpletuner_defaults(given: set[str], res: Imported) -> None:
    """A key the SimpleTuner config leaves out carries SimpleTuner's default, not the preset's (a 100-step run is
    no warm-up in SimpleTuner; its base model is not quantised): set, and listed where the preset's differs."""
    preset = res.defaults["preset"]
    for key, (path, value) in ST_DEFAULTS.items():
        if key in given or res.get(path) is not None:
            continue
        res.set(path, value)
        theirs = _preset_value(preset, path)
        if theirs is not None and theirs != value:
            res.notes.append(
                f"{key} is not set: SimpleTuner's default {value} ({path}), not the {preset} preset's {theirs}"
            )
    if "base_model_precision" in given or "quantization" in res.defaults:
        return
    res.defaults["quantization"] = "none"  # SimpleTuner's no_change
    theirs = _preset_choice(preset, "quantization")
    if theirs != "none":
        clash = (
            f"; it would clash with model.finetune={res.get('model.finetune')}"
            if res.get("model.finetune") in ("lycoris", "full")
            else ""
        )
        res.notes.append(
            f"base_model_precision is not set: SimpleTuner's default no_change (quantization=none), not the {preset} "
            f"preset's quantization={theirs}{clash}"
        )
