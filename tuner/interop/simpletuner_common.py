"""What the SimpleTuner importer's modules share (tuner/interop/simpletuner.py, tuner/interop/simpletuner_data.py,
tuner/interop/simpletuner_families.py): the ``Imported`` result and its error, value converters, path lookup, placeholders,
secrets. Each of those modules builds on this one; none of them imports another's helpers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuner.interop.simpletuner_tables import _SECRET_KEY, _SECRET_VALUE

CONF = Path(__file__).resolve().parents[2] / "conf"


class SimpleTunerError(ValueError):
    """A SimpleTuner config that cannot become an experiment at all (no family, unreadable file)."""


@dataclass
class Imported:
    """The experiment: group choices, values, and the report of what did not carry over."""

    sources: list[str]
    defaults: dict[str, str] = field(default_factory=dict)  # group -> option
    values: dict[str, Any] = field(default_factory=dict)
    unmapped: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    secrets: list[tuple[str, str]] = field(default_factory=list)  # (key, where it goes instead)
    notes: list[str] = field(default_factory=list)  # approximations and things to check
    placeholders: dict[str, str] = field(default_factory=dict)  # what SimpleTuner fills into {model_family} etc.

    def set(self, path: str, value: Any) -> None:
        node = self.values
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    def get(self, path: str) -> Any:
        node: Any = self.values
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return node

    def skip(self, key: str, reason: str, value: Any = "?") -> None:
        if value is None or value is False or value == "" or str(value).lower() in ("false", "0", "none"):
            reason = f"off in SimpleTuner, nothing to carry over ({reason})"
        self.unmapped.append((key, reason))


# ---- values -------------------------------------------------------------------------------------------------
def _bool(value: Any) -> bool:
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no", "none", ""):
        raise ValueError(f"{value!r} is not true or false")
    return text in ("true", "1", "yes")


def _int(value: Any) -> int:
    if not float(value).is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(float(value))


def _size(value: Any) -> float | int:
    """A resolution-like number: pixel sizes as ints, megapixels (below 16) as floats."""
    return int(float(value)) if float(value).is_integer() and float(value) >= 16 else float(value)


def _floats(value: Any) -> list[float]:
    return [float(v) for v in value]


def _side(value: Any) -> int:
    sides = {side.strip() for side in str(value).split("x")}
    if len(sides) != 1 or "," in str(value) or _size(min(sides)) < 16:
        raise ValueError("tuner validates at one square side in pixels")
    return _int(min(sides))


def _put(res: Imported, key: str, path: str, convert: Callable, value: Any) -> None:
    try:
        res.set(path, convert(value))
    except (TypeError, ValueError) as err:
        res.skip(key, f"cannot use {value!r}: {err}")


def tried(value: Any, dirs: list[Path]) -> list[Path]:
    """Where a config's path may be: relative to SimpleTuner's root (the current directory, or a folder above the
    config's: config/examples/NAME/ names paths from the root) or to the config's folder; an absolute path from
    another machine also as the file beside the config."""
    path = Path(str(value)).expanduser()
    if path.is_absolute():
        return [path, dirs[1] / path.name]
    return list(dict.fromkeys(base / path for base in dirs))


def _locate(value: Any, dirs: list[Path]) -> str | None:
    """An existing file or folder, absolute or relative to one of ``dirs``, as an absolute path."""
    found = [path for path in tried(value, dirs) if path.exists()]
    return str(found[0].resolve()) if found else None


def _file(res: Imported, key: str, value: Any, dirs: list[Path]) -> str:
    """A path from the config, made absolute when it is found here (SimpleTuner's are relative to its root)."""
    found = _locate(value, dirs)
    if not found:
        res.notes.append(f"{key}={value!r} is not found here: kept as written")
    return found or str(value)


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SimpleTunerError(f"cannot read the {what} {path}: {err}") from None


ALIASES = {"is_regularization_data": "is_regularisation_data", "hub_model_id": "hub_model_name"}
ALIASES.update(min_snr_gamma="snr_gamma")
# SimpleTuner's deprecated names -> its current ones (its field registry lists them as aliases)
ALIASES.update(checkpointing_steps="checkpoint_step_interval", validation_steps="validation_step_interval")


_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


def expand(value: Any, variables: dict[str, str]) -> Any:
    """SimpleTuner's placeholders, filled as it fills them: ``{model_family}``, ``{output_dir}`` and ``{id}`` in a
    backend's values; ``{env:NAME}`` anywhere, as Hydra's ``${oc.env:NAME,''}`` (read when the run starts)."""
    if isinstance(value, list):
        return [expand(item, variables) for item in value]
    if isinstance(value, dict):
        return {key: expand(item, variables) for key, item in value.items()}
    if not isinstance(value, str):
        return value

    def fill(match: re.Match) -> str:
        token = match.group(1)
        if token.startswith("env:"):
            return "${oc.env:" + token[4:] + ",''}"
        return variables.get(token, match.group(0))

    return _PLACEHOLDER.sub(fill, value)


def _unwrap(data: Any) -> Any:
    """The WebUI's saved config: ``{"_metadata": ..., "config": {...}}`` (whose config may nest another ``config``,
    which its own keys override), or its keys beside ``_metadata``; a plain config as it is."""
    if not isinstance(data, dict):
        return data
    section = data.get("config") if isinstance(data.get("config"), dict) else {}
    nested = section.get("config") if isinstance(section.get("config"), dict) else {}
    outer = {k: v for k, v in data.items() if k not in ("_metadata", "config")}
    return {**nested, **{k: v for k, v in section.items() if k not in ("_metadata", "config")}, **outer}


def _strip(config: dict) -> dict:
    """``{"--model_family": ...}`` -> ``{"model_family": ...}``, one name for each aliased key."""
    keys = (str(k).lstrip("-") for k in config)
    return {ALIASES.get(k, k): v for k, v in zip(keys, config.values(), strict=True)}


def _take_secrets(entry: dict, res: Imported, where: str) -> None:
    for key in list(entry):
        value = entry[key]
        if _SECRET_KEY.search(key.lower()) or (isinstance(value, str) and _SECRET_VALUE.search(value)):
            entry.pop(key)
            res.secrets.append((f"{where}{key}", _secret_home(key, value)))


def _secret_home(key: str, value: Any) -> str:
    key = key.lower()
    if key.startswith("aws_"):
        return f"set {key.upper()} in the environment (or use an AWS profile)"
    if "webhook" in key or (isinstance(value, str) and _SECRET_VALUE.search(value)):
        return 'write {"webhook_url": ...} to a webhook JSON file and set callbacks.webhook.config=FILE'
    if "wandb" in key:
        return "set WANDB_API_KEY in the environment, or run `wandb login`"
    if "hub" in key or "hf" in key.split("_") or "hugging" in key:
        return "set HF_TOKEN in the environment, or run `hf auth login`"
    return "keep it in the environment or a file outside the config; tuner never reads secrets from its config"


def _preset_choice(preset: str, group: str) -> str:
    """The option ``preset`` picks for ``group`` (train.yaml's otherwise)."""
    for conf in (CONF / "preset" / f"{preset}.yaml", CONF / "train.yaml"):
        for entry in (yaml.safe_load(conf.read_text()) or {}).get("defaults", []):
            for key, option in entry.items() if isinstance(entry, dict) else ():
                if key.split()[-1].strip("/") == group:
                    return str(option)
    raise SimpleTunerError(f"no {group} option found in the {preset} preset or train.yaml")
