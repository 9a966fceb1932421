"""On-disk caches of VAE posteriors and text embeddings, as safetensors files.

Each entry's key hashes everything that changes what it holds: for latents the image's identity and
version, its bucket and crop, and the VAE (checkpoint, class, dtype); for text embeddings the caption
and the text encoders. A changed input is a new key, never a stale hit. Entries are written under a
temporary name and renamed when whole; an unreadable entry is treated as missing and recomputed.

Each entry carries a checksum of its tensors (CRC-32, in the file's metadata), verified on every read:
bytes overwritten in place (a bad disk, a copy gone wrong) keep a whole header and the right size, and
would otherwise train as they are. An entry that fails it raises ``CorruptEntry``; the data module
encodes it again. Entries written before checksums are recomputed once, as missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)


CHECKSUM = "tuner_crc32"


class CorruptEntry(OSError):
    """A cache entry whose tensors do not match the checksum written with them."""


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 over each tensor's name, dtype, shape and bytes, in name order."""
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        crc = zlib.crc32(f"{name}:{t.dtype}:{tuple(t.shape)}".encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


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
                if CHECKSUM not in (f.metadata() or {}):
                    path.unlink(missing_ok=True)  # written before checksums: computed again, once
                    return False
                return bool(list(f.keys()))
        except Exception:  # noqa: BLE001 - any damage means "recompute"
            log.warning("cache entry %s is damaged; it will be recomputed", path)
            path.unlink(missing_ok=True)
            return False

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """The entry's tensors, checked against their checksum (``CorruptEntry`` when they differ)."""
        path = self.path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                expected = (f.metadata() or {}).get(CHECKSUM)
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:  # noqa: BLE001
            raise OSError(f"cache entry {path} is unreadable ({err}); delete it and run again") from err
        if expected is not None and checksum(tensors) != expected:
            raise CorruptEntry(f"cache entry {path} fails its checksum (its bytes changed after it was written)")
        return tensors

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata={CHECKSUM: checksum(tensors)})
        os.replace(tmp, path)

    def discard(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
