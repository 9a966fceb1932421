"""A base model that is one file: a CivitAI-style single ``.safetensors`` checkpoint
(``model.pretrained_model_name_or_path=/path/model.safetensors``), or a diffusers base with its denoiser replaced
by a denoiser-only file (``model.denoiser_file``, as Flux fine-tunes ship).

diffusers' ``from_single_file`` reads the file; ``model.base_config`` names the diffusers layout the configs,
tokenizers and scheduler come from (a Hub id or a local folder; by default the family's base repo). The result is
written once as a diffusers folder under ``$TUNER_HOME/bases/`` (named by the file's hash), and the run loads
that folder as it would any checkpoint: the caches, the full fine-tune's pipeline export and sampling all read
the one layout. A checkpoint's identity is the file's hash, not its path: a moved file resumes, an edited one
does not pass for the same base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("tuner")

SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")


def is_file_path(path: Any) -> bool:
    """Whether ``path`` names a weights file (not a diffusers folder or a Hub id)."""
    return str(path).lower().endswith(SUFFIXES)


def uses_base_file(model_cfg: Any) -> bool:
    return is_file_path(model_cfg.pretrained_model_name_or_path) or bool(model_cfg.get("denoiser_file"))


def home() -> Path:
    return Path(os.environ.get("TUNER_HOME") or Path.home() / ".cache" / "tuner")


def family_base(family: str) -> str:
    """The family's base repo: ``pretrained_model_name_or_path`` in conf/model/<family>.yaml."""
    import yaml

    conf = Path(__file__).resolve().parents[2] / "conf" / "model" / f"{family}.yaml"
    return str(yaml.safe_load(conf.read_text())["pretrained_model_name_or_path"])


def base_config(model_cfg: Any) -> str:
    """Where the configs and tokenizers come from: ``model.base_config``, else (a single file) the family's base
    repo, else (a denoiser file) the base model itself."""
    if model_cfg.get("base_config"):
        return str(model_cfg.base_config)
    if is_file_path(model_cfg.pretrained_model_name_or_path):
        return family_base(model_cfg.family)
    return str(model_cfg.pretrained_model_name_or_path)


def digest(path: str | Path) -> str:
    """The file's sha256, remembered by its path, size and mtime (hashing a 7 GB file takes a while)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    known_file = home() / "bases" / "digests.json"
    try:
        known = json.loads(known_file.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                sha.update(block)
        known[key] = sha.hexdigest()
        known_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = known_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(known_file)
    return known[key]


def identity(model_cfg: Any) -> str:
    """The base model as a checkpoint records it: the files' hashes where the base is a file, else its path."""
    from models.trainable import base_identity, base_record

    path = str(model_cfg.pretrained_model_name_or_path)
    if base_record(path) is not None or not uses_base_file(model_cfg):  # a folder written here: its record
        return base_identity(path)
    base = f"sha256:{digest(path)}" if is_file_path(path) else path
    denoiser = model_cfg.get("denoiser_file")
    return f"{base}+{denoiser_name(model_cfg)}=sha256:{digest(denoiser)}" if denoiser else base


def denoiser_name(model_cfg: Any) -> str:
    from tuner.config.families import family_class

    return family_class(model_cfg.family).denoiser_name


def check(model_cfg: Any) -> None:
    """Before anything loads: the files exist and the family's classes read single files."""
    from tuner.config import ConfigError
    from tuner.config.families import family_class

    cls = family_class(model_cfg.family)
    path, denoiser = str(model_cfg.pretrained_model_name_or_path), model_cfg.get("denoiser_file")
    if is_file_path(path):
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"model.pretrained_model_name_or_path={path}: no such file")
        if denoiser:
            raise ConfigError("model.denoiser_file replaces the denoiser of a diffusers base; the base here is a single file already")
        if not hasattr(cls.pipeline_class, "from_single_file"):
            raise ConfigError(
                f"model.pretrained_model_name_or_path={path}: {model_cfg.family}'s pipeline does not read single files; "
                "give a diffusers folder or Hub id, or the denoiser alone as model.denoiser_file"
            )
    if denoiser:
        if not Path(str(denoiser)).expanduser().is_file():
            raise ConfigError(f"model.denoiser_file={denoiser}: no such file")
        denoiser_cls = cls.component_classes()[cls.denoiser_name]
        if not hasattr(denoiser_cls, "from_single_file"):
            raise ConfigError(f"model.denoiser_file: {model_cfg.family}'s {denoiser_cls.__name__} does not read single files")
    elif model_cfg.get("base_config") and not is_file_path(path):
        raise ConfigError("model.base_config is for a single-file base (model.pretrained_model_name_or_path=FILE) or model.denoiser_file")


def resolve(model_cfg: Any) -> str:
    """The diffusers folder or Hub id to load: the base itself, or the folder written from its file(s)."""
    if not uses_base_file(model_cfg):
        return str(model_cfg.pretrained_model_name_or_path)
    ident = identity(model_cfg)
    name = hashlib.sha256(f"{model_cfg.family}:{ident}".encode()).hexdigest()[:20]
    folder = home() / "bases" / f"{model_cfg.family}-{name}"
    from models.trainable import BASE_MARKER

    if (folder / BASE_MARKER).is_file():
        return str(folder)
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    config = base_config(model_cfg)
    log.info("base model from a file: writing it once as a diffusers folder (%s), with %s's configs", folder, config)
    if model_cfg.get("denoiser_file"):
        _with_denoiser(model_cfg, config, tmp)
    else:
        _from_single_file(model_cfg, config, tmp)
    source = {"file": str(model_cfg.pretrained_model_name_or_path), "denoiser_file": model_cfg.get("denoiser_file")}
    (tmp / BASE_MARKER).write_text(json.dumps({"identity": ident, "base_config": config, **source}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return str(folder)


def _file_dtype(path: str):
    """The dtype of a safetensors file's first floating-point weight (None: another format, or none found)."""
    import torch

    if not str(path).lower().endswith((".safetensors", ".sft")):
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            dtype = f.get_slice(key).get_dtype()
            if dtype in ("F16", "BF16", "F32"):
                return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    return None


def _local(config: str) -> dict:
    return {"local_files_only": True} if Path(config).exists() else {}


def _from_single_file(model_cfg: Any, config: str, out: Path) -> None:
    from tuner.config.families import family_class

    cls = family_class(model_cfg.family).pipeline_class
    path = str(Path(str(model_cfg.pretrained_model_name_or_path)).expanduser())
    pipe = cls.from_single_file(path, config=config, torch_dtype=_file_dtype(path), **_local(config))
    pipe.save_pretrained(out, safe_serialization=True)


def _with_denoiser(model_cfg: Any, config: str, out: Path) -> None:
    """The base's folder (a local one, or the Hub snapshot of all but its denoiser) linked in, and the denoiser
    read from its file into its own subfolder."""
    from tuner.config.families import family_class

    cls = family_class(model_cfg.family)
    name = cls.denoiser_name
    base = Path(str(model_cfg.pretrained_model_name_or_path)).expanduser()
    if not base.is_dir():
        from huggingface_hub import snapshot_download

        base = Path(snapshot_download(str(base), revision=model_cfg.get("revision"), ignore_patterns=[f"{name}/*"]))
    out.mkdir(parents=True)
    for entry in base.iterdir():
        if entry.name != name and not entry.name.startswith("."):
            (out / entry.name).symlink_to(entry.resolve())
    denoiser_cls = cls.component_classes()[name]
    file = str(Path(str(model_cfg.denoiser_file)).expanduser())
    model = denoiser_cls.from_single_file(file, config=config, subfolder=name, torch_dtype=_file_dtype(file), **_local(config))
    model.save_pretrained(out / name, safe_serialization=True)
