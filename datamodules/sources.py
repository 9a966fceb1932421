"""Where images come from. A source lists items and opens them; everything after (probing, captions,
buckets, loading) is the same for every source.

Each source kind lives in its own module and registers itself in ``SOURCE_TYPES``; ``open_source``
picks one from ``type`` or infers it from ``path``:

- a local folder (``folder``), scanned recursively;
- ``s3://bucket/prefix/`` (``s3``);
- webdataset ``.tar`` shards, a folder of them or a brace pattern (``webdataset``);
- a metadata table ``.jsonl``, ``.csv`` or ``.parquet`` with a file or URL column (``table``).
"""

from __future__ import annotations

import abc
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar

from datamodules.images import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGES
from datamodules.video import VIDEO_EXTENSIONS

MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS  # what a source lists as samples


@dataclass(frozen=True)
class Item:
    """One image in a source.

    ``key`` is its identity within the source (a relative path, an S3 key, ``shard.tar/member``, a
    table row's file or URL), ``location`` what a person is shown (a path or URL), and ``version``
    changes whenever its bytes may have (mtime and size, an ETag): caches are keyed on both.
    """

    key: str
    location: str
    size: int
    version: str
    caption: str | None = None  # a caption the source carries itself (a table's caption column)
    extras: tuple = ()  # (column, cell) pairs: a table row's companion-image cells (datamodules/pairs.py)


class Source(abc.ABC):
    """A dataset's items. Subclasses set ``kind`` and implement ``items`` and ``open``."""

    kind: ClassVar[str]
    #: where captions come from when ``caption_strategy`` is left unset (null)
    default_caption_strategy: ClassVar[str] = "filename"

    def __init__(self, path: str, options: dict | None = None):
        self.path = path
        self.options = dict(options or {})

    @abc.abstractmethod
    def items(self) -> Iterator[Item]:
        """Every image item, in a stable order. Raise ``SourceError`` when the source itself is unusable
        (a missing folder, a bucket that does not exist, a pattern that matches nothing)."""

    @abc.abstractmethod
    def open(self, item: Item) -> BinaryIO:
        """The item's bytes as a readable binary file object."""

    def open_header(self, item: Item) -> BinaryIO:
        """Enough of the item to read its image header (size, EXIF). The whole item by default."""
        return self.open(item)

    def sidecar(self, item: Item) -> bytes | None:
        """The raw bytes of the item's ``.txt`` caption sidecar, or None when it has none."""
        return None

    def identity(self) -> str:
        """What names this source in cache keys and reports."""
        return f"{self.kind}:{self.path}"


class SourceError(ValueError):
    """A dataset source that cannot be read at all: raised before any model weights load."""


SOURCE_TYPES: dict[str, type[Source]] = {}


def register(cls: type[Source]) -> type[Source]:
    SOURCE_TYPES[cls.kind] = cls
    return cls


def infer_type(path: str) -> str:
    """The source kind a ``path`` implies: s3:// is s3, .tar shards are webdataset, a table file is table."""
    lowered = path.lower()
    if lowered.startswith("s3://"):
        return "s3"
    if lowered.endswith((".jsonl", ".csv", ".parquet")):
        return "table"
    # Compressed shards are claimed too, so that their source can say why it refuses them.
    shard_ends = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.zst", ".tar.bz2")
    if lowered.endswith(shard_ends) or ".tar}" in lowered or (os.path.isdir(path) and _only_tars(path)):
        return "webdataset"
    return "folder"


def _only_tars(path: str) -> bool:
    """A folder of shards: ``.tar`` files and no images or sub-folders beside them (an index, a README
    or a checksum list may sit there too)."""
    entries = [e for e in os.listdir(path) if not e.startswith(".")]
    if not any(e.endswith(".tar") for e in entries):
        return False
    images = MEDIA_EXTENSIONS | UNSUPPORTED_IMAGES
    return not any(os.path.splitext(e)[1].lower() in images or os.path.isdir(os.path.join(path, e)) for e in entries)


def open_source(path: str, type: str | None = None, options: dict | None = None) -> Source:
    kind = type or infer_type(path)
    _load_builtin_sources()
    if kind not in SOURCE_TYPES:
        raise SourceError(f"unknown dataset type {kind!r}; valid: {', '.join(sorted(SOURCE_TYPES))}")
    return SOURCE_TYPES[kind](path, options)


def _load_builtin_sources() -> None:
    # Imported on demand, so that a folder run never imports boto3 or webdataset.
    import importlib

    for module in ("datamodules.source_s3", "datamodules.source_webdataset", "datamodules.source_table"):
        try:
            importlib.import_module(module)
        except ImportError:  # an optional dependency is missing; that kind is then unknown
            continue


@register
class FolderSource(Source):
    """Image files under a local folder, recursive; hidden files and folders and non-images ignored."""

    kind = "folder"

    def items(self) -> Iterator[Item]:
        root = Path(self.path).expanduser()
        if not root.is_dir():
            raise SourceError(f"data path {str(root)!r} is not a directory")
        seen_dirs: set[str] = set()
        # Symlinked folders are followed (datasets are often assembled from links), once each.
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                suffix = Path(filename).suffix.lower()
                if filename.startswith(".") or (suffix not in MEDIA_EXTENSIONS and suffix not in UNSUPPORTED_IMAGES):
                    continue  # hidden files and non-image clutter (captions, notes) are not images
                path = Path(dirpath) / filename
                try:
                    st = path.stat()
                except OSError:
                    continue  # vanished between listing and stat
                yield Item(
                    key=str(path.relative_to(root)),
                    location=str(path),
                    size=st.st_size,
                    version=f"{st.st_mtime_ns}:{st.st_size}",
                )

    def open(self, item: Item) -> BinaryIO:
        return open(item.location, "rb")

    def sidecar(self, item: Item) -> bytes | None:
        txt = Path(item.location).with_suffix(".txt")
        return txt.read_bytes() if txt.is_file() else None


def read_all(source: Source, item: Item) -> io.BytesIO:
    """The item's whole content in memory, for decoders that want a seekable buffer."""
    with source.open(item) as f:
        return io.BytesIO(f.read())
