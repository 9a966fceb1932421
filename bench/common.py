"""What the benchmarks share: the real Hydra config, composed the way train.py composes it."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def compose_config(overrides: list[str]):
    """conf/train.yaml with ``overrides`` (the tiny preset unless they choose another)."""
    from hydra import compose, initialize_config_dir

    from tuner.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))
