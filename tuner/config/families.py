"""The families tuner knows: ``conf/model/*.yaml`` is the one list.

Each YAML names its family (``family: sd15``) and its class (``_target_: models.sd.SDModule``); the
tiny-pipeline writer, the presets, the run's checks and the family test matrix all read it from here.
A new family is its class file plus its YAML (and presets), with nothing to register.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

CONF = Path(__file__).resolve().parents[2] / "conf"


@cache
def families() -> dict[str, str]:
    """family -> the dotted path of its class, from ``conf/model/*.yaml`` (sorted by family)."""
    found = {}
    for path in sorted((CONF / "model").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        if "family" in doc and "_target_" in doc:
            found[str(doc["family"])] = str(doc["_target_"])
    return found


def family_class(family: str) -> type:
    """The class of ``family``; a ValueError naming the known ones otherwise."""
    from models.base import resolve

    known = families()
    if family not in known:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(known)}")
    return resolve(known[family])


def run_class(model_cfg) -> type:
    """The class a run of ``model_cfg`` trains: its family's, or with ``model.control`` set the family's
    control-LoRA class (Flux.1's ``FluxControlPipeline``), which ``check_family`` puts in ``model._target_``."""
    from models.base import resolve

    cls = family_class(model_cfg.family)
    return resolve(cls.control_class) if model_cfg.get("control") and cls.control_class else cls


def tiny_names() -> dict[str, str]:
    """What ``python -m tuner.tiny`` accepts: every family, and each family's declared tiny variants
    (flux-dev, flux-schnell, ...), mapped to their family."""
    names = {}
    for family in families():
        names[family] = family
        names.update({variant: family for variant in family_class(family).tiny_variants})
    return names


def write_tiny(name: str, path: str | Path, seed: int = 0, learnable: bool = False) -> Path:
    """A tiny random pipeline of a family (or one of its variants) at ``path``, in the real on-disk layout
    (kept if already there). ``learnable``: its VAE and text encoders made to behave like real ones (models/learnable.py),
    what was measured of it written to ``learnable.json`` beside it."""
    from models.tiny import write_pipeline

    if (Path(path) / "model_index.json").exists():
        return Path(path)  # already there: no need to import every family to name it
    family = tiny_names().get(name, name)
    cls = family_class(family)
    if not learnable:
        return write_pipeline(lambda: cls.tiny_pipeline(name, seed), path)

    import json

    from models.learnable import make_learnable

    measured: dict[str, float] = {}

    def build():
        pipe = cls.tiny_pipeline(name, seed)
        measured.update(make_learnable(pipe, seed))
        return pipe

    return write_pipeline(build, path, lambda: {"learnable.json": json.dumps(measured, indent=1)})


def check_family(cfg) -> None:
    """The config against what its family declares, before any weight loads: family-only options, text
    encoder names, keys that belong to the other noise schedule, and the bucket step. Settles the typed
    options and the per-encoder quantisation levels in place. Raises ConfigError."""
    import dataclasses

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from tuner.config import ConfigError, suggest

    model = cfg.model
    try:
        cls = family_class(model.family)
    except ValueError as err:
        raise ConfigError(f"model.family: {err}") from None
    _check_requirements(model.family, cls)
    _check_base_file(model)  # before the family's checks, which may read the checkpoint's configs
    if model.get("control"):
        if not cls.control_class:
            takers = [f for f in families() if family_class(f).control_class]
            raise ConfigError(
                f"model.control={model.control}: model={model.family} has no control LoRA (families that do: "
                f"{', '.join(takers) or 'none'})"
            )
        model._target_ = cls.control_class
        cls = run_class(model)
    from tuner.config.paired import check_frames, check_paired, wire_demo_clips, wire_demo_references

    wire_demo_references(cfg, cls)
    wire_demo_clips(cfg, cls)
    check_paired(cfg, cls)
    check_frames(cfg, cls)
    valid = [f.name for f in dataclasses.fields(cls.Options)]
    for key in model.options:
        if key not in valid:
            hint = suggest(str(key), valid) if valid else f" {model.family} has no family options."
            raise ConfigError(f"unknown config key 'model.options.{key}'.{hint}")
    try:
        options = OmegaConf.merge(OmegaConf.structured(cls.Options), model.options)
    except OmegaConfBaseException as err:
        raise ConfigError(f"model.options: {err}".splitlines()[0]) from None
    model.options = OmegaConf.to_container(options)
    try:
        cls.check_config(model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check_schedule_keys(cfg, cls)
    _check_loss_type(model)
    _check_two_experts(model)
    _check_lora_formats(cfg, cls)
    _check_text_encoder_lora(model, cls)
    _expert_validation_levels(cfg)
    _settle_text_encoders(cfg, cls)
    steps = {"data": cfg.data.bucket_step}
    steps.update({f"data.datasets.{k}": v.get("bucket_step") for k, v in cfg.data.datasets.items()})
    multiple = cls.pixel_multiple_for(model)  # the checkpoint's (Wan 2.2 TI2V-5B's VAE: 32)
    for where, step in steps.items():
        if step is not None and step % multiple:
            raise ConfigError(f"{where}.bucket_step={step}: this {model.family} checkpoint needs image edges divisible by {multiple}")


def _check_schedule_keys(cfg, cls) -> None:
    from tuner.config import ConfigError

    model, val = cfg.model, cfg.callbacks.validation
    if cls.noise_schedule == "flow":
        wrong = [k for k in ("min_timestep", "max_timestep", "prediction_type") if model[k] is not None]
        wrong += ["zero_terminal_snr"] * bool(model.zero_terminal_snr) + ["min_snr_gamma"] * bool(model.min_snr_gamma)
        if val.loss_timesteps is not None:
            wrong.append("callbacks.validation.loss_timesteps")
        if wrong:
            raise ConfigError(
                f"{', '.join(w if '.' in w else 'model.' + w for w in wrong)}: DDPM settings, but {model.family} is a "
                "flow-matching family; use model.min_noise_level/max_noise_level and callbacks.validation.loss_levels"
            )
    else:
        if model.timestep_sampling != "uniform" or model.loss_weighting != "none":
            raise ConfigError(
                f"model.timestep_sampling={model.timestep_sampling}, model.loss_weighting={model.loss_weighting}: "
                f"flow-matching settings, but {model.family} is a DDPM family (use uniform and none; min_snr_gamma "
                "weights DDPM losses)"
            )


def _check_loss_type(model) -> None:
    """``model.huber_c``, for the loss types that use it: > 0, and at most 1 where a schedule takes the threshold
    from 1 (no noise) down to it (sd-scripts' exponential schedule takes its logarithm)."""
    from tuner.config import ConfigError

    loss_type, schedule = (str(getattr(v, "value", v)) for v in (model.loss_type, model.huber_schedule))
    if loss_type == "l2":
        return
    if schedule == "constant" and not model.huber_c > 0:
        raise ConfigError(f"model.huber_c={model.huber_c} with model.loss_type={loss_type}; it must be > 0 (0.1 is usual)")
    if schedule != "constant" and not 0 < model.huber_c <= 1:
        raise ConfigError(
            f"model.huber_c={model.huber_c} with model.huber_schedule={schedule}; valid: 0 < huber_c <= 1 (0.1 is "
            "usual; the threshold falls from 1 at no noise to huber_c at pure noise)"
        )


def _settle_text_encoders(cfg, cls) -> None:
    import logging

    from tuner.config import ConfigError

    quant = cfg.quantization
    names = cls.text_encoder_names()
    if quant.text_encoder_2_precision is not None:
        logging.getLogger("tuner").warning(
            "quantization.text_encoder_2_precision is deprecated; use quantization.text_encoders.text_encoder_2=%s",
            quant.text_encoder_2_precision,
        )
        quant.text_encoders.setdefault("text_encoder_2", quant.text_encoder_2_precision)
        quant.text_encoder_2_precision = None
    for name in quant.text_encoders:
        if name not in names:
            raise ConfigError(
                f"quantization.text_encoders.{name}: {cfg.model.family} has no such text encoder; valid: {', '.join(names)}"
            )


def _check_base_file(model) -> None:
    """A single-file base or a denoiser file (tuner/interop/base_file.py): the files and the family's loaders."""
    from tuner.interop import base_file

    if model.get("base_config") or base_file.uses_base_file(model):
        base_file.check(model)


def _check_requirements(family: str, cls) -> None:
    """A package the family needs (its ``requires``: module -> the extra that installs it), checked before
    anything loads: the libraries' own errors for a missing one can be baffling."""
    import importlib.util

    from tuner.config import ConfigError

    for module, extra in cls.requires.items():
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"model={family} needs the {module} package: pip install -e \".[{extra}]\"")


def _check_lora_formats(cfg, cls) -> None:
    import importlib.util

    from tuner.config import ConfigError

    if cfg.model.finetune == "lycoris" and importlib.util.find_spec("lycoris") is None:
        raise ConfigError('model.finetune=lycoris needs the lycoris-lora package: pip install -e ".[lycoris]"')
    if "kohya" not in cfg.export.lora_formats:
        return
    if cfg.model.finetune != "lora":
        raise ConfigError(
            f"export.lora_formats=[kohya] is for LoRA runs (model.finetune={cfg.model.finetune}); a full fine-tune "
            "becomes one A1111 file with python -m tuner.export single-file"
        )
    if cfg.model.family not in cls.kohya_base_versions:
        raise ConfigError(
            f"export.lora_formats=[kohya]: kohya's LoRA format is for the UNet families (sd15, sd2, sdxl, kolors); "
            f"{cfg.model.family}'s diffusers-format LoRA is what ComfyUI reads"
        )
    if cfg.model.lora.get("use_dora"):  # diffusers' kohya converter knows no DoRA magnitudes (kohya's dora_scale)
        raise ConfigError(
            "export.lora_formats=[kohya] with model.lora.use_dora: the kohya file would carry the DoRA magnitudes "
            "under names A1111 and ComfyUI do not read; export the DoRA as export.lora_formats=[diffusers]"
        )


def _check_text_encoder_lora(model, cls) -> None:
    """``model.lora.text_encoders``: encoders the family's pipeline loads a LoRA into (its ``text_encoder_lora_targets``)."""
    from tuner.config import ConfigError

    wanted = list(model.lora.get("text_encoders") or [])
    if not wanted:
        return
    valid = list(cls.text_encoder_lora_targets)
    if not valid:
        raise ConfigError(
            f"model.lora.text_encoders={wanted}: {model.family}'s pipeline loads no text-encoder LoRA "
            "(diffusers reads one for sd15, sd2, sdxl, kolors, sd3 and flux); train the denoiser's LoRA alone"
        )
    unknown = [name for name in wanted if name not in valid]
    if unknown or len(set(wanted)) != len(wanted):
        raise ConfigError(f"model.lora.text_encoders={wanted}: valid for {model.family}: {', '.join(valid)} (each once)")
    if model.experts is not None:
        raise ConfigError(
            "model.lora.text_encoders with model.experts=two_lora: the text encoders are shared by both experts; "
            "train their LoRA in a run of one expert"
        )


def _check_two_experts(model) -> None:
    """``model.experts=two_lora`` and ``model.expert_partner``, against the rest of the model keys."""
    from pathlib import Path

    from tuner.config import ConfigError

    lo, hi = model.min_noise_level, model.max_noise_level
    if model.experts is not None:
        if model.expert is not None or model.expert_partner is not None:
            raise ConfigError(
                "model.experts=two_lora trains both experts; unset model.expert and model.expert_partner (they are "
                "for a run that trains one expert)"
            )
        if model.finetune != "lora":
            raise ConfigError("model.experts=two_lora trains a LoRA adapter per expert; it needs model.finetune=lora")
        if model.min_timestep is not None or model.max_timestep is not None:
            raise ConfigError("model.experts with model.min_timestep/max_timestep: give the range as noise levels only")
        if not lo < model.expert_boundary < hi:
            raise ConfigError(
                f"model.expert_boundary={model.expert_boundary}; valid: inside the trained noise range "
                f"model.min_noise_level={lo}..max_noise_level={hi}, so that each expert has a part of it"
            )
    if model.expert_partner is not None:
        if model.expert is None:
            raise ConfigError(
                "model.expert_partner names the other expert's weights for a run that trains one expert: set "
                "model.expert=low_noise|high_noise too"
            )
        if not Path(model.expert_partner).exists():
            raise ConfigError(
                f"model.expert_partner={model.expert_partner}: no such file or folder (give the other expert's LoRA "
                "file, its run's output folder, or its pipeline/ folder)"
            )


def _expert_validation_levels(cfg) -> None:
    """An expert's validation loss is measured on its own part of the noise range: the levels outside it
    are dropped (the middle of the range stands in when none is left)."""
    from models.noise import noise_levels

    if cfg.model.expert is None:
        return
    lo, hi = noise_levels(cfg.model)
    val = cfg.callbacks.validation
    kept = [level for level in val.loss_levels if lo <= level < hi]
    val.loss_levels = kept or [(lo + hi) / 2]

