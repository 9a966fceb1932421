"""The family's module from the config: the base model's path checked (one line, before the loaders' several),
the family's classes imported (the last of the start-up imports), and the module built with what it needs from the
other groups (the optimiser, the schedule, precision, quantisation)."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tuner.config import ConfigError


def import_family(cfg: DictConfig) -> None:
    """Import the family's component classes (diffusers, transformers, peft with them): the last of the
    start-up imports, after which the garbage collector that train.py held off goes back on, before any
    weight loads (tuner/runtime/startup.py)."""
    from hydra.utils import get_class

    from tuner.runtime.startup import imports_done

    get_class(cfg.model._target_).component_classes()
    imports_done()


_KEY = "model.pretrained_model_name_or_path"


def check_model_path(path: str) -> None:
    """A local base model must be a diffusers pipeline folder: one line now, instead of the loader's
    several about the Hub. A Hub id (``owner/name``) is tried when it loads (``build_module``)."""
    from tuner.interop.base_file import SUFFIXES, is_file_path

    local = Path(path).expanduser()
    if is_file_path(path):  # a single-file checkpoint (tuner/interop/base_file.py checks it)
        return
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ConfigError(f"{_KEY}={path} is a folder but not a diffusers pipeline (it has no model_index.json)")
        return
    if local.exists():
        raise ConfigError(
            f"{_KEY}={path} is a file; point it at a diffusers pipeline folder, a Hub id, or a single-file checkpoint "
            f"({', '.join(SUFFIXES)})"
        )
    if path.startswith(("/", "./", "../", "~", ".\\")) or "\\" in path or path.count("/") > 1:
        raise ConfigError(f"{_KEY}={path}: no such folder (nor is it a Hub id, owner/name)")


def build_module(cfg: DictConfig, with_optimizer: bool = True):
    """The family's module from ``cfg.model``, with what it needs from the other groups. A Hub id that cannot
    be fetched is one line (a ConfigError) that says what was tried."""
    try:
        return _build_module(cfg, with_optimizer)
    except Exception as wrapped:  # hydra's instantiate wraps what the loader raised
        err, seen = wrapped, set()
        while err is not None and not isinstance(err, OSError) and id(err) not in seen:
            seen.add(id(err))
            err = err.__cause__ or err.__context__
        path = cfg.model.pretrained_model_name_or_path
        if err is None or Path(path).expanduser().exists():
            raise
        from huggingface_hub import constants

        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ConfigError(
            f"{_KEY}={path}: could not load it from the Hugging Face Hub at {constants.ENDPOINT}{offline}: "
            f"{str(err).splitlines()[0][:200]} Check the id, the connection or HF_TOKEN, or point it at a local "
            "pipeline folder"
        ) from wrapped


def optimizer_factory(cfg: DictConfig):
    """The optimiser's constructor from ``cfg.optimizer``, less tuner's own key (``stochastic_rounding``)."""
    settings = OmegaConf.to_container(cfg.optimizer, resolve=True)
    settings.pop("stochastic_rounding", None)
    return instantiate(settings)


def _build_module(cfg: DictConfig, with_optimizer: bool):
    from tuner.interop.base_file import resolve

    return instantiate(
        cfg.model,
        pretrained_model_name_or_path=resolve(cfg.model),  # a single-file base: the folder written from it
        optimizer=optimizer_factory(cfg) if with_optimizer else None,
        stochastic_rounding=bool(cfg.optimizer.get("stochastic_rounding")),
        lr_scheduler=instantiate(cfg.lr_scheduler) if with_optimizer else None,
        caption_dropout_probability=cfg.data.caption_dropout_probability,
        mixed_precision=cfg.mixed_precision,
        seed=cfg.seed,
        base_model_precision=cfg.quantization.base_model_precision,
        text_encoder_precision=cfg.quantization.text_encoder_precision,
        text_encoders=dict(cfg.quantization.text_encoders),
        on_nonfinite=cfg.on_nonfinite,
        max_nonfinite_skips=cfg.max_nonfinite_skips,
    )
