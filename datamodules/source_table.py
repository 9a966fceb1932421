"""A metadata table (``.jsonl``, ``.csv`` or ``.parquet``) whose rows name images and their captions.

This is the Hugging Face imagefolder layout (``metadata.jsonl`` with ``file_name`` and ``text``) and the
usual shape of scraped caption sets: a column holds a file path or an http(s) URL, another the caption.
Relative paths are relative to the table's own folder. URLs are fetched lazily, in ``open``, into
``<cache_dir>/urls/`` and reused from there, so a failed download costs one image, not the run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import http.client
import json
import logging
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from datamodules.sources import Item, Source, SourceError, register

log = logging.getLogger(__name__)

TABLE_EXTENSIONS = (".jsonl", ".csv", ".parquet")
DEFAULT_IMAGE_COLUMN = "file_name"
DEFAULT_CAPTION_COLUMN = "text"
DOWNLOAD_TIMEOUT_S = 30.0
DOWNLOAD_ATTEMPTS = 3
_BACKOFF_S = 0.5  # first retry delay; doubles each attempt
_USER_AGENT = "tuner-dataset/1.0"


class DownloadError(OSError):
    """A URL that could not be fetched: an OSError, so the scan records the image as skipped."""


def is_url(value: str) -> bool:
    return value.lower().startswith(("http://", "https://"))


def url_cache_path(cache_dir: str | os.PathLike, url: str) -> Path:
    """Where ``url`` is kept: a hash of the URL (stable across runs) plus its extension, for humans."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]
    ext = os.path.splitext(urlparse(url).path)[1].lower()
    if not (2 <= len(ext) <= 6 and ext[1:].isalnum()):
        ext = ".img"
    return Path(cache_dir) / "urls" / f"{digest}{ext}"


def download(url: str, dest: Path) -> None:
    """Fetch ``url`` to ``dest`` atomically, retrying connection errors, 5xx and 429 with backoff."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    last: str = "no attempt"
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt:
            time.sleep(_BACKOFF_S * 2 ** (attempt - 1))
        try:
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                # A temp file in the same folder: os.replace is then atomic, and a concurrent loader
                # (another worker fetching the same URL) never sees a half-written image.
                fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
                try:
                    with os.fdopen(fd, "wb") as out:
                        while chunk := response.read(1 << 20):
                            out.write(chunk)
                    os.replace(tmp, dest)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            return
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
            err.close()
            if not (err.code >= 500 or err.code == 429):
                break  # the server's final answer: retrying will not change a 404 or 403
        except (OSError, http.client.HTTPException) as err:  # refused, reset, DNS, timeout, cut short
            last = str(getattr(err, "reason", None) or err) or type(err).__name__
    raise DownloadError(f"download failed: {last}")


def _caption(value: Any) -> str | None:
    """A caption cell as text; None for what a table uses to mean "no caption"."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = value if isinstance(value, str) else str(value)
    text = text.strip()
    return text or None


def _cell(value: Any) -> str | None:
    """An image cell as a string, or None when it is empty (null, NaN, blank)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


@register
class TableSource(Source):
    """Rows of a metadata table: an image column (path or URL) and a caption column."""

    kind = "table"
    default_caption_strategy = "column"

    @property
    def image_column(self) -> str:
        return self.options.get("image_column") or DEFAULT_IMAGE_COLUMN

    @property
    def caption_column(self) -> str:
        return self.options.get("caption_column") or DEFAULT_CAPTION_COLUMN

    @property
    def table_path(self) -> Path:
        return Path(self.path).expanduser()

    # --- reading the table -------------------------------------------------------------------------

    @property
    def companion_columns(self) -> list[str]:
        """Columns that name each row's companion images (``conditioning.<kind>.column``)."""
        return list(self.options.get("companion_columns") or [])

    def _rows(self) -> Iterator[tuple[int, Any, Any, dict]]:
        """(row number, image cell, caption cell, companion cells) for every row, in table order."""
        path = self.table_path
        suffix = path.suffix.lower()
        if suffix not in TABLE_EXTENSIONS:
            raise SourceError(f"table {str(path)!r} has an unknown extension; valid: {', '.join(TABLE_EXTENSIONS)}")
        if not path.is_file():
            raise SourceError(f"table {str(path)!r} does not exist")
        reader = {".jsonl": self._jsonl_rows, ".csv": self._csv_rows, ".parquet": self._parquet_rows}[suffix]
        return reader(path)

    def _check_columns(self, path: Path, columns: list[str]) -> None:
        """The image column must be there, and the caption column when the captions come from it."""
        have = ", ".join(repr(c) for c in columns) or "none"
        if self.image_column not in columns:
            raise SourceError(
                f"table {str(path)!r} has no image column {self.image_column!r} (set image_column); its columns: {have}"
            )
        for column in self.companion_columns:
            if column not in columns:
                raise SourceError(f"table {str(path)!r} has no companion column {column!r}; its columns: {have}")
        if self.options.get("caption_strategy") == "column" and self.caption_column not in columns:
            raise SourceError(
                f"table {str(path)!r} has no caption column {self.caption_column!r} (set caption_column, or "
                f"caption_strategy=filename to caption by file name); its columns: {have}"
            )

    def _jsonl_rows(self, path: Path) -> Iterator[tuple[int, Any, Any]]:
        # Parsed fully first: the missing-column check needs every row's keys, and it must fail
        # before the scan has done any work.
        rows: list[tuple[int, dict]] = []
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SourceError(f"table {str(path)!r}, line {number}: not valid JSON ({err.msg})") from err
                if not isinstance(row, dict):
                    raise SourceError(f"table {str(path)!r}, line {number}: expected a JSON object")
                rows.append((number, row))
        columns = list(dict.fromkeys(k for _, row in rows for k in row))
        if rows:
            self._check_columns(path, columns)
        for number, row in rows:
            yield number, row.get(self.image_column), row.get(self.caption_column), self._extras(row)

    def _csv_rows(self, path: Path) -> Iterator[tuple[int, Any, Any]]:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                return  # an empty file: no rows, so no images; the scan reports that
            self._check_columns(path, list(reader.fieldnames))
            for row in reader:
                # line_num counts physical lines read so far, which is where this row ends
                yield reader.line_num, row.get(self.image_column), row.get(self.caption_column), self._extras(row)

    def _parquet_rows(self, path: Path) -> Iterator[tuple[int, Any, Any]]:
        import pyarrow.parquet as pq  # optional: only tables in parquet need it

        try:
            columns = list(pq.read_schema(path).names)
        except Exception as err:  # pyarrow raises its own ArrowInvalid for a damaged file
            raise SourceError(f"table {str(path)!r} is not a readable parquet file: {err}") from err
        self._check_columns(path, columns)
        has_caption = self.caption_column in columns
        wanted = [self.image_column] + ([self.caption_column] if has_caption else []) + self.companion_columns
        table = pq.read_table(path, columns=list(dict.fromkeys(wanted)))
        images = table.column(self.image_column).to_pylist()
        captions = table.column(self.caption_column).to_pylist() if has_caption else [None] * len(images)
        extras = {c: table.column(c).to_pylist() for c in self.companion_columns}
        for number, (image, caption) in enumerate(zip(images, captions, strict=True), start=1):
            yield number, image, caption, {c: values[number - 1] for c, values in extras.items()}

    def _extras(self, row: dict) -> dict:
        return {c: row.get(c) for c in self.companion_columns}

    # --- the Source API ----------------------------------------------------------------------------

    def items(self) -> Iterator[Item]:
        for number, image, caption, extras in self._rows():
            value = _cell(image)
            if value is None:
                log.warning("%s row %d: empty %r; row skipped", self.table_path, number, self.image_column)
                continue
            cells = tuple((c, _cell(v)) for c, v in extras.items())
            yield dataclasses.replace(self._item(value), caption=_caption(caption), extras=cells)

    def companion(self, item: Item, column: str) -> Item | None:
        """The companion image the row of ``item`` names in ``column`` (None: the cell is empty)."""
        value = dict(item.extras).get(column)
        return None if value is None else self._item(value)

    def _item(self, value: str) -> Item:
        """The item of an image cell: a URL, or a path relative to the table's folder."""
        if is_url(value):
            return self._url_item(value, None)
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.table_path.parent / path
        location = os.path.abspath(path)
        try:
            st = os.stat(location)
            size, version = st.st_size, f"{st.st_mtime_ns}:{st.st_size}"
        except OSError:
            # Kept, not dropped: opening it fails in the scan, which reports it as skipped.
            size, version = -1, "missing"
        return Item(key=value, location=location, size=size, version=version)

    def _url_item(self, url: str, caption: str | None) -> Item:
        cache_dir = self.options.get("cache_dir")
        if cache_dir is None:
            raise SourceError(f"table {str(self.table_path)!r} lists URLs ({url}): set data.cache_dir to download them")
        cached = url_cache_path(cache_dir, url)
        try:
            size = cached.stat().st_size
        except OSError:
            size = -1  # unknown until fetched; never 0, which the scan would take for an empty file
        # The version is the URL alone, fetched or not: a URL is downloaded once and then stands for
        # those bytes, and caches keyed on it must not change when the download lands.
        return Item(key=url, location=url, size=size, version=url, caption=caption)

    def open(self, item: Item) -> BinaryIO:
        if not is_url(item.location):
            return open(item.location, "rb")
        cache_dir = self.options.get("cache_dir")
        if cache_dir is None:
            raise SourceError(f"cannot fetch {item.location}: no cache_dir to download into")
        cached = url_cache_path(cache_dir, item.location)
        if not cached.is_file():
            download(item.location, cached)
        return open(cached, "rb")

    def sidecar(self, item: Item) -> bytes | None:
        return None  # captions come from the caption column
