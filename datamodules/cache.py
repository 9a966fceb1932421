"""On-disk caches of VAE posteriors and text embeddings, as safetensors files.

Each entry's key hashes everything that changes what it holds: for latents the image's identity and
version, its bucket and crop, and the VAE (checkpoint, class, dtype); for text embeddings the caption
and the text encoders. A changed input is a new key, never a stale hit. Entries are written under a
temporary name and renamed when whole; an unreadable entry is treated as missing and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class TensorCache:
    """``key -> {name: tensor}`` under ``root/<2 hex>/<key>.safetensors``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """True when a whole, readable entry exists (its header is read, not its tensors)."""
        path = self.path(key)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                return bool(list(f.keys()))
        except Exception:  # noqa: BLE001 - any damage means "recompute"
            log.warning("cache entry %s is damaged; it will be recomputed", path)
            path.unlink(missing_ok=True)
            return False

    def load(self, key: str) -> dict[str, torch.Tensor]:
        path = self.path(key)
        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001
            raise OSError(f"cache entry {path} is unreadable ({err}); delete it and run again") from err

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
