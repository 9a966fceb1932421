"""Webdataset shards (``.tar``) as a source, read in place.

Each shard is indexed once with ``tarfile`` (member offsets and sizes, never their bytes), so an image
is one seek and one read into the shard: no extraction, random access for the bucket sampler. Samples
follow webdataset's key convention: ``a/b/000123.jpg`` and its caption ``a/b/000123.txt`` (or
``.json`` with a ``caption``, ``text`` or ``prompt`` field) share the key ``a/b/000123``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from datamodules.sources import MEDIA_EXTENSIONS, Item, Source, SourceError, register

log = logging.getLogger(__name__)

_IMAGE_EXTS = frozenset(ext.lstrip(".") for ext in MEDIA_EXTENSIONS)  # a sample's image or clip member
_JSON_CAPTION_FIELDS = ("caption", "text", "prompt")
_COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.lz4")
# Magic numbers of compressed streams, for a compressed shard that is named plain ``.tar``.
_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
}


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) by webdataset's rule: the key runs to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


@dataclass
class _ShardIndex:
    """One shard's members, as (offset, size): what ``items``, ``open`` and ``sidecar`` need."""

    stamp: tuple[int, int]  # (mtime_ns, size) when indexed: a shard rewritten since needs a new index
    images: list[tuple[str, int, int]] = field(default_factory=list)  # (member, offset, size), in order
    # Images and caption sidecars by normalized name ``key.ext`` (extension lowercased).
    members: dict[str, tuple[int, int]] = field(default_factory=dict)


def _compressed_suffix(path: str) -> bool:
    return path.lower().endswith(_COMPRESSED_SUFFIXES)


def _refuse_compressed(path: str) -> SourceError:
    return SourceError(
        f"webdataset shard {path!r} is compressed; only uncompressed .tar shards can be read in place "
        "(decompress them first, e.g. gunzip)"
    )


def _read_range(shard: str, offset: int, size: int) -> bytes:
    """A member's bytes; fewer when the shard was cut short, which the scan reports as a truncated image."""
    with open(shard, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


@register
class WebDatasetSource(Source):
    """Images in webdataset ``.tar`` shards: one file, a folder of them, or a brace pattern.

    Holds no open file: every read opens its shard, so the source pickles into DataLoader workers.
    """

    kind = "webdataset"
    default_caption_strategy = "textfile"  # the key's .txt, or a caption field of its .json

    def __init__(self, path: str, options: dict | None = None):
        super().__init__(path, options)
        self._index: dict[str, _ShardIndex] = {}

    def __getstate__(self) -> dict:
        # Workers only ``open`` items, whose version carries the offset: the index need not travel.
        state = dict(self.__dict__)
        state["_index"] = {}
        return state

    def shards(self) -> list[str]:
        """The shard paths ``path`` names, in order; only those that exist."""
        path = os.path.expanduser(self.path)
        if "{" in path:
            try:
                from braceexpand import braceexpand
            except ImportError as err:
                raise SourceError(
                    f"brace pattern {self.path!r} needs the braceexpand package (pip install webdataset)"
                ) from err
            candidates = list(dict.fromkeys(braceexpand(path)))
            for candidate in candidates:
                if _compressed_suffix(candidate):
                    raise _refuse_compressed(candidate)
            found = [c for c in candidates if os.path.isfile(c)]
            missing = len(candidates) - len(found)
            if not found:
                raise SourceError(f"webdataset pattern {self.path!r} matches no shard ({len(candidates)} names tried)")
            if missing:
                log.warning("webdataset pattern %r: %d of %d shards are missing", self.path, missing, len(candidates))
            return found
        if _compressed_suffix(path):
            raise _refuse_compressed(path)
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isfile(Path(path, n)))
            tars = [str(Path(path, n)) for n in names if n.lower().endswith(".tar")]
            if not tars:
                compressed = [n for n in names if _compressed_suffix(n)]
                if compressed:
                    raise _refuse_compressed(str(Path(path, compressed[0])))
                raise SourceError(f"webdataset folder {self.path!r} holds no .tar shard")
            return tars
        if not os.path.isfile(path):
            raise SourceError(f"webdataset shard {self.path!r} does not exist")
        return [path]

    def _build_index(self, shard: str) -> _ShardIndex:
        """Read every member header of ``shard`` (tarfile seeks past the data, it does not read it)."""
        stamp = _stamp(shard)
        with open(shard, "rb") as f:
            magic = f.read(6)
            for prefix, name in _COMPRESSED_MAGIC.items():
                if magic.startswith(prefix):
                    raise tarfile.ReadError(f"{name}-compressed; only uncompressed .tar shards can be read in place")
            f.seek(0)
            index = _ShardIndex(stamp)
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for info in tar:
                        self._add_member(index, info)
            except (tarfile.TarError, EOFError) as err:
                if not index.members:
                    raise
                # Damaged after some members: keep those, as a folder keeps the files it can list.
                log.warning("webdataset shard %s is damaged after %d members (%s)", shard, len(index.members), err)
        return index

    @staticmethod
    def _add_member(index: _ShardIndex, info: tarfile.TarInfo) -> None:
        if not info.isreg() or info.name.rpartition("/")[2].startswith("."):
            return
        key, ext = split_key(info.name)
        if ext in _IMAGE_EXTS:
            index.images.append((info.name, info.offset_data, info.size))
        elif ext not in ("txt", "json"):
            return
        index.members[f"{key}.{ext}"] = (info.offset_data, info.size)

    def _shard_index(self, shard: str) -> _ShardIndex:
        """The cached index of ``shard``, rebuilt when the shard changed on disk since."""
        cached = self._index.get(shard)
        if cached is None or cached.stamp != _stamp(shard):
            cached = self._index[shard] = self._build_index(shard)
        return cached

    def items(self) -> Iterator[Item]:
        readable, failures = 0, []
        shards = self.shards()
        # Keys carry the shard's path below the shards' common folder, so that same-named shards in
        # different folders (a pattern like /d/{laion,coyo}/00000.tar) never share keys.
        root = os.path.commonpath([os.path.dirname(os.path.abspath(s)) for s in shards]) if shards else ""
        for shard in shards:
            try:
                index = self._build_index(shard)
            except (OSError, tarfile.TarError, EOFError) as err:
                log.warning("skipping unreadable webdataset shard %s: %s", shard, err)
                failures.append(f"{shard}: {err}")
                continue
            self._index[shard] = index
            readable += 1
            mtime_ns, shard_size = index.stamp
            name = os.path.relpath(os.path.abspath(shard), root)
            for member, offset, size in index.images:
                yield Item(
                    key=f"{name}/{member}",
                    location=f"{shard}#{member}",
                    size=size,
                    version=f"{mtime_ns}:{shard_size}:{offset}",
                )
        if not readable:
            raise SourceError(f"no readable webdataset shard in {self.path!r}: {failures[0]}")

    @staticmethod
    def _locate(item: Item) -> tuple[str, str]:
        """(shard path, member name) from the location ``<shard>.tar#<member>``."""
        cut = item.location.index(".tar#") + len(".tar")
        return item.location[:cut], item.location[cut + 1 :]

    def open(self, item: Item) -> BinaryIO:
        shard, member = self._locate(item)
        mtime_ns, shard_size, offset = (int(part) for part in item.version.split(":"))
        if _stamp(shard) == (mtime_ns, shard_size):
            return io.BytesIO(_read_range(shard, offset, item.size))
        # The shard was rewritten since the scan: its offsets moved, so look the member up afresh.
        key, ext = split_key(member)
        found = self._shard_index(shard).members.get(f"{key}.{ext}")
        if found is None:
            raise FileNotFoundError(f"{member!r} is no longer in webdataset shard {shard}")
        return io.BytesIO(_read_range(shard, *found))

    def sidecar(self, item: Item) -> bytes | None:
        shard, member = self._locate(item)
        key, _ = split_key(member)
        members = self._shard_index(shard).members
        if f"{key}.txt" in members:
            return _read_range(shard, *members[f"{key}.txt"])
        if f"{key}.json" not in members:
            return None
        raw = _read_range(shard, *members[f"{key}.json"])
        try:
            meta = json.loads(raw)
        except ValueError as err:  # reported by the scan as an unreadable caption
            raise UnicodeError(f"{key}.json is not valid JSON: {err}") from err
        if isinstance(meta, dict):
            for name in _JSON_CAPTION_FIELDS:
                if isinstance(meta.get(name), str):
                    return meta[name].encode("utf-8")
        return None
