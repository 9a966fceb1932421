"""What ``python train.py`` does to reach its first step sooner, with nothing about the run changed.

- **The cyclic garbage collector is off while the libraries import.** Importing torch, diffusers,
  transformers, peft, Lightning and Hydra creates about half a million long-lived objects, and with the
  collector on Python walks them again and again as they pile up: over a second of a tiny run's start
  (bench/startup.py). ``imports_done`` collects once and turns the collector back on before any weight
  loads, so loading and training run as they always did, and no garbage from the imports is kept.
- **Hydra composes the config once, not twice.** Before composing the run's config, Hydra composes the
  whole config once more only to read ``hydra.mode`` (``Hydra.get_mode``): about 0.15 s. When nothing on
  the command line can set that key, the answer is known without composing: it is unset.

Only the command-line entry points use this; a library user's imports and Hydra are left alone.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path

_SETS_MODE = re.compile(r"^\s*mode\s*:", re.MULTILINE)
_HYDRA_KEY = re.compile(r"^hydra\s*:|@package\s+hydra\b", re.MULTILINE)


def collector_off() -> None:
    """Called first thing by train.py, before any library imports."""
    gc.disable()


def imports_done() -> None:
    """Where the start-up imports end and weights start to load: collect what the imports left behind
    and turn the collector back on. A no-op when it was on already (tests, a library user, later jobs of
    a sweep)."""
    if gc.isenabled():
        return
    gc.collect()
    gc.enable()


def _yaml_texts(config_dir: str | Path) -> dict[Path, str]:
    return {path: path.read_text(errors="replace") for path in Path(config_dir).rglob("*.yaml")}


def mode_groups(config_dir: str | Path, texts: dict[Path, str] | None = None) -> set[str]:
    """The config groups (folders under ``config_dir``, e.g. ``hparams_search``) with a file that may set
    ``hydra.mode``. Read as text, conservatively: a file counts when it has a ``mode:`` key and either a
    top-level ``hydra:`` block or a ``hydra`` package line."""
    root = Path(config_dir)
    texts = _yaml_texts(root) if texts is None else texts
    return {
        path.parent.relative_to(root).as_posix()
        for path, text in texts.items()
        if _SETS_MODE.search(text) and _HYDRA_KEY.search(text)
    }


def mode_is_unset(config_dir: str | Path, overrides: list[str], argv: list[str], primary: str = "train") -> bool:
    """True when no config this command line can compose sets ``hydra.mode``, so Hydra's probe compose
    would find it unset. False whenever that is not certain: an override of ``hydra.mode`` or the search
    path, another config source on the command line (``--config-dir`` / ``-cd`` and the like), an override
    that picks a group with a file that sets the mode, or such a group picked by any config file other
    than as the primary config's ``<group>: null`` default."""
    if any(a.startswith(("--config", "-cd", "-cp", "-cn")) for a in argv):
        return False
    root = Path(config_dir)
    texts = _yaml_texts(root)
    groups = mode_groups(root, texts)
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0].split("@", 1)[0].strip()
        if key.startswith(("hydra.mode", "hydra.searchpath")) or key in groups:
            return False
    if not groups:
        return True
    mentions = re.compile("|".join(re.escape(g.rpartition("/")[2]) for g in sorted(groups)))
    for path, text in texts.items():
        if path.parent.relative_to(root).as_posix() in groups:
            continue
        lines = [line for line in text.splitlines() if mentions.search(line)]
        if path == root / f"{primary}.yaml":
            lines = [line for line in lines if not re.search(r":\s*null\s*$", line)]
        if lines:
            return False
    return True


def skip_mode_probe(config_dir: str | Path, argv: list[str]) -> None:
    """Let Hydra skip its probe compose (``Hydra.get_mode``) when ``mode_is_unset`` says what it would
    find. Hydra then picks the mode from ``-m`` as it does whenever the config leaves the mode unset."""
    from hydra._internal.hydra import Hydra

    probe = getattr(Hydra, "get_mode", None)
    if probe is None or getattr(probe, "tuner_skips", False):
        return  # a Hydra without the probe (pinned <1.4, which has it), or skipped already

    def get_mode(self, config_name, overrides):
        if mode_is_unset(config_dir, list(overrides), argv, config_name or "train"):
            return None
        return probe(self, config_name, overrides)

    get_mode.tuner_skips = True
    Hydra.get_mode = get_mode
