"""Images and clips in an S3 bucket (or an S3-compatible store such as MinIO or R2): ``s3://bucket/prefix/``.

An image is fetched whole. A video clip is read as it is consumed, by ranged GETs pinned to the listed ETag
(``ObjectStream``): probing reads its headers, and decoding seeks to the frame window, so a long clip is never
downloaded whole.

boto3 is imported only when the source is used, so that this module (which ``open_source`` always
imports) loads without it. Credentials come from the standard AWS chain (environment, profile,
instance role), never from the config, so that they stay out of saved configs and reports.
"""

from __future__ import annotations

import io
import os
import posixpath
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from datamodules.sources import MEDIA_EXTENSIONS, Item, Source, SourceError, register
from datamodules.video import VIDEO_EXTENSIONS

_READ_ATTEMPTS = 4  # GET + body read, on top of botocore's own retries of the request
_BACKOFF_S = 0.5
_DENIED_CODES = frozenset(
    {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"}
)
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_CHANGED_CODES = frozenset({"PreconditionFailed", "412"})
# A clip's ranged reads: the first fetch reads this much ahead, each further sequential fetch twice as much, up to
# the most; a seek starts again from the first (a probe reads a few headers, a decode streams a window).
READ_AHEAD_FIRST, READ_AHEAD_MOST = 256 << 10, 8 << 20


def parse_s3_path(path: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b/'): the prefix is a folder, so 'a' never matches 'ab/...'."""
    if not path.lower().startswith("s3://"):
        raise SourceError(f"S3 data path {path!r} must start with s3://")
    bucket, _, prefix = path[5:].partition("/")
    if not bucket:
        raise SourceError(f"S3 data path {path!r} names no bucket (expected s3://bucket/prefix/)")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _error_code(err: Exception) -> str:
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))


@register
class S3Source(Source):
    """Image objects under a bucket prefix; hidden keys (any ``.name`` part) and non-images ignored."""

    kind = "s3"

    def __init__(self, path: str, options: dict | None = None):
        super().__init__(path, options)
        self.bucket, self.prefix = parse_s3_path(path)
        self.endpoint_url: str | None = self.options.get("endpoint_url") or None
        self._client: Any = None
        self._client_pid: int | None = None
        self._lock = threading.Lock()  # the scan probes from several threads
        # Full keys of the .txt objects seen by items(): sidecar() only GETs those that exist.
        self._texts: set[str] | None = None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    # A boto3 client holds sockets and is not picklable; a forked DataLoader worker must not reuse the
    # parent's connections either, so the client is rebuilt per process.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_client_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _s3(self) -> Any:
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                self._client = self._new_client()
                self._client_pid = os.getpid()
            return self._client

    def _new_client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as err:
            raise SourceError(f"reading {self.url} needs boto3: pip install boto3") from err
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},  # 5xx, throttling, dropped connections
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=16,  # the scan's probe threads share the client
        )
        # A session of its own: boto3's default session is not safe to share between threads.
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)

    def _listing_error(self, err: Exception) -> SourceError:
        """A listing failure as one clear line naming the bucket, instead of a botocore traceback."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        where = f"bucket {self.bucket!r}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return SourceError(
                f"no AWS credentials found for {self.url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                f"or AWS_PROFILE, or run on a machine with an instance role ({err})"
            )
        if isinstance(err, ClientError):
            code = _error_code(err)
            if code == "NoSuchBucket":
                return SourceError(f"S3 {where} does not exist (data path {self.path!r})")
            if code in _DENIED_CODES:
                return SourceError(
                    f"access denied listing S3 {where} (data path {self.path!r}): check the credentials "
                    f"and that they may s3:ListBucket ({code})"
                )
            return SourceError(f"cannot list S3 {where} (data path {self.path!r}): {code or err}")
        return SourceError(f"cannot list S3 {where} (data path {self.path!r}): {err}")

    def items(self) -> Iterator[Item]:
        client = self._s3()  # first: a SourceError, not an ImportError, when boto3 is missing
        from botocore.exceptions import BotoCoreError, ClientError

        # The whole listing is read before the first item is yielded: a sidecar sorts after its image
        # ('a.png' < 'a.txt'), and sidecar() is asked while items are still being consumed.
        objects: list[tuple[str, int, str]] = []
        texts: set[str] = set()
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    relative = key[len(self.prefix) :]
                    if not relative or any(part.startswith(".") for part in relative.split("/")):
                        continue
                    ext = posixpath.splitext(relative)[1].lower()
                    if ext == ".txt":
                        texts.add(key)
                    elif ext in MEDIA_EXTENSIONS:
                        objects.append((key, int(obj.get("Size", 0)), str(obj.get("ETag", "")).strip('"')))
        except (ClientError, BotoCoreError) as err:
            raise self._listing_error(err) from None
        self._texts = texts
        for key, size, etag in sorted(objects):
            yield Item(
                key=key[len(self.prefix) :],
                location=f"s3://{self.bucket}/{key}",
                size=size,
                version=etag,
            )

    def _get(self, key: str, span: tuple[int, int] | None = None, etag: str = "") -> bytes | None:
        """The object's bytes (``span``: bytes first to last, inclusive; ``etag``: only from that version), or None
        when it does not exist.

        botocore retries the request itself (5xx, throttling, refused connections); this also retries
        a body cut off mid-read, which botocore does not. Failures become OSError, which the data
        module treats as an unreadable image rather than a crash.
        """
        self._s3()  # first: a SourceError, not an ImportError, when boto3 is missing
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        request = {"Bucket": self.bucket, "Key": key}
        if span is not None:
            request["Range"] = f"bytes={span[0]}-{span[1]}"
        if etag:
            request["IfMatch"] = f'"{etag}"'
        for attempt in range(_READ_ATTEMPTS):
            try:
                response = self._s3().get_object(**request)
                with response["Body"] as body:
                    return body.read()
            except ClientError as err:
                code = _error_code(err)
                if code in _MISSING_CODES:
                    return None
                if code in _CHANGED_CODES:
                    raise OSError(f"s3://{self.bucket}/{key} changed while it was read (ETag no longer {etag})") from None
                raise OSError(f"cannot read s3://{self.bucket}/{key}: {code or err}") from None
            except (NoCredentialsError, PartialCredentialsError) as err:
                raise OSError(f"cannot read s3://{self.bucket}/{key}: {err}") from None
            except (BotoCoreError, OSError) as err:  # dropped connection, timeout, short body
                if attempt == _READ_ATTEMPTS - 1:
                    raise OSError(f"cannot read s3://{self.bucket}/{key}: {err}") from None
                time.sleep(_BACKOFF_S * 2**attempt)
        return None  # not reached: the last attempt returns or raises

    def open(self, item: Item) -> BinaryIO:
        key = self.prefix + item.key
        if posixpath.splitext(key)[1].lower() in VIDEO_EXTENSIONS and item.size > 0:
            return ObjectStream(self, key, item.size, item.version)
        data = self._get(key)
        if data is None:
            raise OSError(f"s3://{self.bucket}/{key} no longer exists")
        return io.BytesIO(data)

    def sidecar(self, item: Item) -> bytes | None:
        key = posixpath.splitext(self.prefix + item.key)[0] + ".txt"
        if self._texts is not None and key not in self._texts:
            return None
        return self._get(key)  # not listed yet (items() not run in this copy): ask, None if absent

    def identity(self) -> str:
        return f"s3:{self.endpoint_url or 'aws'}:{self.url}"


class ObjectStream(io.RawIOBase):
    """An S3 object as a seekable file read on demand: each read past what is held fetches the next span by a
    ranged GET, reading further ahead while reads stay sequential (``READ_AHEAD_FIRST`` doubling up to
    ``READ_AHEAD_MOST``). Every GET names the listed ETag, so an object replaced mid-read fails with OSError
    rather than mixing two versions. ``fetched`` and ``requests`` count what came over the network."""

    def __init__(self, source: S3Source, key: str, size: int, etag: str = ""):
        super().__init__()
        self._source, self._key, self._size, self._etag = source, key, size, etag
        self._pos = 0
        self._held, self._held_at = b"", 0
        self._ahead = READ_AHEAD_FIRST
        self.fetched = self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if start + offset < 0:
            raise OSError(f"negative seek position {start + offset}")
        self._pos = start + offset
        return self._pos

    def readinto(self, buffer) -> int:
        if self._pos >= self._size or not len(buffer):
            return 0
        offset = self._pos - self._held_at
        if not 0 <= offset < len(self._held):
            sequential = self._pos == self._held_at + len(self._held) and self.requests
            self._ahead = min(2 * self._ahead, READ_AHEAD_MOST) if sequential else READ_AHEAD_FIRST
            last = min(self._size, self._pos + max(len(buffer), self._ahead)) - 1
            data = self._source._get(self._key, (self._pos, last), self._etag)
            if not data:
                raise OSError(f"s3://{self._source.bucket}/{self._key} ended at byte {self._pos} of {self._size}")
            self._held, self._held_at, offset = data, self._pos, 0
            self.fetched += len(data)
            self.requests += 1
        n = min(len(buffer), len(self._held) - offset)
        buffer[:n] = self._held[offset : offset + n]
        self._pos += n
        return n
