"""One-line hints for mistakes in a command line or an experiment file: a misspelled key, a group choice that
does not exist, a wrong type in a file. Hydra's own messages for these run to 5-19 lines; train.py prints
these instead, before anything loads."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def suggest(key: str, valid: list[str]) -> str:
    """'Did you mean' text for a misspelled key, listing the valid keys."""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}."


def _schema_knows(override: str, config_dir: str) -> bool:
    """Whether an override surely names a key that exists, by the typed schema alone: a group choice, a
    ``+``/``~`` edit (Hydra checks those itself), or a path of dataclass fields. Keys under untyped parts
    (optimizer, lr_scheduler, model.options, ...) are not known this way."""
    import dataclasses
    import typing

    key = override.split("=", 1)[0]
    if key.startswith(("+", "~", "hydra")) or (Path(config_dir) / key.split("@")[0]).is_dir():
        return True
    from tuner.config import TrainConfig

    node: Any = TrainConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return False
        hints = typing.get_type_hints(node)
        if part not in hints:
            return False
        node = hints[part]
    return True


def _group_choice_hint(override: str, config_dir: str) -> str | None:
    """For ``group=name`` (``model=foo``, ``preset=foo``, ``+experiment=foo``) where conf/<group>/ has no
    ``name.yaml``: one line with the valid names (Hydra's own message is ~17 lines, its search path included).
    None otherwise, and for a sweep's ``a,b`` or anything Hydra resolves itself."""
    key, sep, value = override.partition("=")
    group = key.lstrip("+").split("@")[0]
    if not sep or not group or group.startswith("hydra") or any(c in value for c in ",()[]{}$*"):
        return None
    folder = Path(config_dir) / group
    if not folder.is_dir() or value in ("", "null") or (folder / f"{value}.yaml").is_file():
        return None
    valid = sorted(p.stem for p in folder.glob("*.yaml"))
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    names = ", ".join(valid) or "none yet"
    return f"{group}={value}: there is no {group} {value!r} (conf/{group}/{value}.yaml).{hint} Valid: {names}."


def _file_type_error(message: str, config_dir: str) -> str | None:
    """Hydra's 5-line report of a wrong type in a config file (an experiment's ``max_train_steps: "ten"``) as
    one line: the file, the key, what was wrong. None for any other message."""
    found = re.match(r"In '([^']+)': ValidationError raised while composing config:\n(.+?)\n\s+full_key: (\S+)", message)
    if not found:
        return None
    source, problem, key = found.groups()
    path = Path(config_dir) / f"{source}.yaml"
    where = str(path) if path.is_file() else source
    return f"{where}: {key}: {problem}"


def unknown_key_hint(overrides: list[str], config_dir: str, config_name: str = "train") -> str | None:
    """For a single run whose overrides name a key that no schema has, a message that names the key
    and lists the valid keys at that level (Hydra's own error names only the key). None otherwise."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    searched = any(o.lstrip("+").startswith("hydra.searchpath") for o in overrides)  # other folders hold groups too
    for override in [] if searched else overrides:
        hint = _group_choice_hint(override, config_dir)
        if hint:
            return hint
    user_files = [o for o in overrides if o.split("=", 1)[0].lstrip("+").split("@")[0] == "experiment"]
    if not user_files and all(_schema_knows(o, config_dir) for o in overrides):
        return None  # nothing to look up: no second compose on the way to the first step
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        try:
            compose(config_name, overrides=overrides)
            return None
        except ConfigCompositionException as err:
            cause = err.__cause__
            in_file = _file_type_error(str(err), config_dir)
            if in_file:
                return in_file
        if not isinstance(cause, (ConfigKeyError, ConfigAttributeError)) or not cause.full_key:
            return None  # not a misspelled key: Hydra's own message says it best
        bad = cause.full_key
        try:
            base = compose(config_name, overrides=[o for o in overrides if o.split("=", 1)[0] != bad])
        except ConfigCompositionException:
            return None
    parent_path, _, leaf = bad.rpartition(".")
    parent = OmegaConf.select(base, parent_path) if parent_path else base
    if not isinstance(parent, DictConfig):
        return None
    valid = [str(k) for k in parent.keys() if not str(k).startswith("_")]
    return f"unknown config key {bad!r}.{suggest(leaf, valid)}"
