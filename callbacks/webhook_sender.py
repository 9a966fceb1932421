"""Webhook delivery: the config file and the background sender (the Lightning callback is in webhook.py).

The seed's ``webhook.json`` names a webhook URL, its type, a message prefix and a minimum level. The
URL is a secret (anyone holding it can post to the channel), so it is kept out of every ``repr``,
log record, exception message and ``state_dict``: only :class:`WebhookSender` ever reads it.

Delivery runs on a daemon thread behind a bounded queue, so a slow or dead Discord never stalls a
training step: ``send`` never blocks and never raises; what cannot be delivered is dropped and counted,
and the count is logged once when the sender closes (nothing is lost silently).

``webhook_type``:

- ``discord``: ``{"content": "<prefix>: <text>"}`` (truncated to Discord's 2000 characters, mentions
  disabled); images go as ``multipart/form-data`` (``payload_json`` + ``files[0..9]``), ten per message.
- ``raw``: a plain JSON POST ``{"level", "message", "prefix", "images"}`` where ``images`` is a list of
  ``{"filename", "content_type", "data_base64"}`` (ten per message, like Discord); no truncation.
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from callbacks.webhook_format import DISCORD_CONTENT_LIMIT, encode  # noqa: F401 - re-exported

log = logging.getLogger("callbacks.webhook")

LEVELS: dict[str, int] = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
WEBHOOK_TYPES = ("discord", "raw")
CONFIG_KEYS = ("webhook_url", "webhook_type", "message_prefix", "log_level")
MAX_ATTACHMENTS = 10
REDACTED = "<webhook-url>"
USER_AGENT = "tuner-webhook/0.1"


# --------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class WebhookConfig:
    """The seed's webhook.json. ``repr`` hides the URL, so the config can be logged or printed safely."""

    webhook_url: str = dataclasses.field(repr=False)
    webhook_type: str = "discord"
    message_prefix: str | None = None
    log_level: str = "info"

    def __repr__(self) -> str:
        return (
            f"WebhookConfig(webhook_url={REDACTED!r}, webhook_type={self.webhook_type!r}, "
            f"message_prefix={self.message_prefix!r}, log_level={self.log_level!r})"
        )

    __str__ = __repr__


def load_webhook_config(path: str | os.PathLike) -> WebhookConfig:
    """Read and validate webhook.json; any problem is a ``ValueError`` naming the key (never the URL)."""
    where = f"webhook config {os.fspath(path)}"
    p = Path(path).expanduser()
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: cannot read the file ({type(e).__name__})") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        # e.msg/lineno/colno only: the exception's str() is safe, but never quote the document itself.
        raise ValueError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {', '.join(CONFIG_KEYS)}")

    unknown = sorted(k for k in data if k not in CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(CONFIG_KEYS)}"
        )

    url = data.get("webhook_url")
    if url is None:
        raise ValueError(f"{where}: missing required key 'webhook_url' (the Discord webhook URL)")
    if not isinstance(url, str) or not _is_http_url(url.strip()):
        raise ValueError(f"{where}: 'webhook_url' must be an http(s) URL (value not shown: it is a secret)")

    kind = data.get("webhook_type", "discord")
    if not isinstance(kind, str) or kind.strip().lower() not in WEBHOOK_TYPES:
        raise ValueError(f"{where}: 'webhook_type' must be one of {', '.join(WEBHOOK_TYPES)}, got {kind!r}")

    prefix = data.get("message_prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise ValueError(f"{where}: 'message_prefix' must be a string or null, got {type(prefix).__name__}")

    level = data.get("log_level", "info")
    if not isinstance(level, str) or level.strip().lower() not in LEVELS:
        raise ValueError(f"{where}: 'log_level' must be one of {', '.join(LEVELS)}, got {level!r}")

    return WebhookConfig(
        webhook_url=url.strip(),
        webhook_type=kind.strip().lower(),
        message_prefix=prefix or None,
        log_level=level.strip().lower(),
    )


def _is_http_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    return LEVELS[str(level).lower()]


# --------------------------------------------------------------------------------------------- sender
@dataclasses.dataclass(frozen=True)
class _Message:
    level: str
    text: str
    images: tuple[tuple[str, bytes], ...] = ()


_STOP = object()
_WAKE = object()


class WebhookSender:
    """Posts messages from a daemon thread so the training loop never waits on the network.

    ``send`` filters by level, splits image groups into messages of at most ten, and enqueues without
    blocking (a full queue drops and counts). The worker honours HTTP 429 (``retry_after`` in the JSON
    body or the ``Retry-After`` header), retries 5xx, timeouts and connection errors with capped
    exponential backoff (``backoff_base * 2**attempt``, at most ``backoff_max``) and gives up after
    ``max_retries`` retries, counting the drop. Other 4xx answers are permanent and dropped at once.
    """

    def __init__(
        self,
        config: WebhookConfig,
        *,
        max_queue: int = 100,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        max_retry_after: float = 60.0,
        request_timeout: float = 10.0,
    ):
        self.config = config
        self.max_retries = int(max_retries)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.max_retry_after = float(max_retry_after)
        self.request_timeout = float(request_timeout)
        self._url = config.webhook_url
        self._secrets = _secret_parts(self._url)
        self._min_level = LEVELS[config.log_level]
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(max_queue)))
        self._lock = threading.Lock()
        self._sent = 0
        self._dropped = 0
        self._filtered = 0
        self._warned_full = False
        self._not_before = 0.0  # monotonic time before which Discord asked us not to post
        self._closing = threading.Event()
        self._abort = threading.Event()
        self._closed = False
        self._urgent: collections.deque[_Message] = collections.deque()
        self._held: _Message | None = None  # a message an urgent one interrupted; sent next
        self._abandoned = False  # close() gave up on the request in flight
        self._opener = urllib.request.build_opener()
        self._thread = threading.Thread(target=self._run, name="webhook-sender", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return (
            f"WebhookSender(type={self.config.webhook_type!r}, log_level={self.config.log_level!r}, "
            f"sent={self.sent}, dropped={self.dropped})"
        )

    # counters ------------------------------------------------------------------------------------
    @property
    def sent(self) -> int:
        with self._lock:
            return self._sent

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped

    @property
    def filtered(self) -> int:
        """Messages below ``log_level``: not sent on purpose, so not counted as dropped."""
        with self._lock:
            return self._filtered

    def _count(self, sent: int = 0, dropped: int = 0, filtered: int = 0) -> None:
        with self._lock:
            self._sent += sent
            self._dropped += dropped
            self._filtered += filtered

    # public ----------------------------------------------------------------------------------------
    def send(
        self, level: str | int, text: str, images: Sequence[tuple[str, bytes]] | None = None, urgent: bool = False
    ) -> bool:
        """Queue ``text`` (and images, ten per message); True when everything was queued. Never raises.

        ``urgent`` (the final "training complete"): posted before anything still waiting in the queue,
        so that when the exit's short wait runs out it is the backlog that is dropped."""
        try:
            number = _level_number(level)
            if number < self._min_level:
                self._count(filtered=1)
                return True
            name = _level_name(number)
            text = self.redact(str(text))
            imgs = [(str(n), bytes(b)) for n, b in (images or ())]
            chunks = [imgs[i : i + MAX_ATTACHMENTS] for i in range(0, len(imgs), MAX_ATTACHMENTS)] or [[]]
            ok = True
            for i, chunk in enumerate(chunks):
                part = text if len(chunks) == 1 else f"{text} ({i + 1}/{len(chunks)})"
                ok = self._enqueue(_Message(name, part, tuple(chunk)), urgent) and ok
            return ok
        except Exception as e:  # a notification must never take the run down
            self._count(dropped=1)
            log.debug("webhook: message dropped (%s)", type(e).__name__)
            return False

    def close(self, timeout: float = 2.0) -> None:
        """Deliver what can be delivered within ``timeout`` seconds, stop the thread, log the drop count.

        The wait is bounded by ``timeout`` (plus a moment), whatever the server does: a request still in
        flight then is abandoned to the daemon thread and counted as dropped."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        try:
            self._queue.put_nowait(_STOP)  # wakes an idle worker; a full queue wakes it anyway
        except queue.Full:
            pass
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            self._abort.set()  # interrupts backoff waits
            left = len(self._urgent) + (self._held is not None)
            self._urgent.clear()
            self._held = None
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP and item is not _WAKE:
                    left += 1
            self._thread.join(0.1)
            if self._thread.is_alive():
                self._abandoned = True  # the request in flight: counted as dropped here, not again by the worker
                left += 1
            self._count(dropped=left)
        dropped, sent = self.dropped, self.sent
        if dropped:
            log.warning("webhook: %d message(s) could not be delivered and were dropped (%d sent)", dropped, sent)
        else:
            log.debug("webhook: closed (%d sent)", sent)

    def redact(self, text: str) -> str:
        """Replace the webhook URL (and its token path) anywhere in ``text``."""
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    # worker ----------------------------------------------------------------------------------------
    def _enqueue(self, message: _Message, urgent: bool = False) -> bool:
        if self._closing.is_set():
            self._count(dropped=1)
            log.debug("webhook: message dropped (sender closed)")
            return False
        if urgent:
            self._urgent.append(message)
            try:
                self._queue.put_nowait(_WAKE)  # an idle worker picks it up at once
            except queue.Full:
                pass  # a busy worker looks at the urgent ones before its next message
            return True
        try:
            self._queue.put_nowait(message)
            return True
        except queue.Full:
            self._count(dropped=1)
            if not self._warned_full:
                self._warned_full = True
                log.warning("webhook: queue full (%d); dropping messages until it drains", self._queue.maxsize)
            else:
                log.debug("webhook: queue full; message dropped")
            return False

    def _take(self) -> tuple[_Message | None, bool]:
        """The next message and whether it is urgent: urgent ones first, then one an urgent message
        interrupted, then the queue. (None, False) when there is nothing yet."""
        try:
            return self._urgent.popleft(), True
        except IndexError:
            pass
        if self._held is not None:
            held, self._held = self._held, None
            return held, False
        try:
            item = self._queue.get(timeout=0.5)
        except queue.Empty:
            return None, False
        if item is _STOP or item is _WAKE:
            return None, False
        return item, False

    def _idle(self) -> bool:
        return not self._urgent and self._held is None and self._queue.empty()

    def _run(self) -> None:
        while True:
            item, urgent = self._take()
            if item is None:
                if self._closing.is_set() and self._idle():
                    return
                continue
            if self._abort.is_set():
                self._count(dropped=1)
                continue
            try:
                self._deliver(item, urgent)
            except Exception as e:  # never let the worker die: count and go on
                self._count(dropped=1)
                log.warning("webhook: message dropped (%s: %s)", type(e).__name__, self.redact(str(e)))
            if self._closing.is_set() and self._idle():
                return

    def _pause(self, seconds: float, urgent: bool) -> str | None:
        """Wait ``seconds``; 'abort' when the sender is closing for good, 'preempt' when an urgent message
        arrives while a normal one waits (it goes first), else None."""
        deadline = time.monotonic() + seconds
        while True:
            if self._abort.is_set():
                return "abort"
            if not urgent and self._urgent:
                return "preempt"
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._abort.wait(min(left, 0.05))

    def _deliver(self, message: _Message, urgent: bool = False) -> None:
        body, content_type = encode(self.config, message)
        attempt = 0
        while True:
            wait = self._not_before - time.monotonic()
            if wait > 0 and self._interrupted(message, self._pause(wait, urgent)):
                return
            try:
                status, headers, payload = self._post(body, content_type)
            except (OSError, http.client.HTTPException) as e:  # timeouts, refused, reset, bad status line
                reason = f"{type(e).__name__}: {self.redact(str(e))}"
                delay = self._backoff(attempt)
            else:
                if 200 <= status < 300:
                    self._count(sent=1, dropped=-1 if self._abandoned else 0)  # it got there after all
                    self._note_rate_limit(headers)
                    return
                if status == 429:
                    reason = "HTTP 429 (rate limited)"
                    delay = self._retry_after(headers, payload)
                    if delay is None:
                        delay = self._backoff(attempt)
                elif status >= 500:
                    reason = f"HTTP {status}"
                    delay = self._backoff(attempt)
                else:  # 400, 401, 403, 404, 413...: retrying cannot help
                    self._count(dropped=0 if self._abandoned else 1)
                    log.warning("webhook: message rejected with HTTP %d; dropped", status)
                    return
            attempt += 1
            if attempt > self.max_retries:
                self._count(dropped=0 if self._abandoned else 1)
                log.warning("webhook: giving up after %d retries (%s); message dropped", self.max_retries, reason)
                return
            log.debug("webhook: %s; retry %d/%d in %.3gs", reason, attempt, self.max_retries, delay)
            if self._interrupted(message, self._pause(delay, urgent)):
                return

    def _interrupted(self, message: _Message, why: str | None) -> bool:
        if why == "abort" and not self._abandoned:
            self._count(dropped=1)
        elif why == "preempt":
            self._held = message  # retried once the urgent message is out
        return why is not None

    def _post(self, body: bytes, content_type: str) -> tuple[int, Mapping[str, str], bytes]:
        request = urllib.request.Request(
            self._url,
            data=body,
            method="POST",
            headers={"Content-Type": content_type, "User-Agent": USER_AGENT},
        )
        try:
            with self._opener.open(request, timeout=self.request_timeout) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:  # a non-2xx answer: still an answer, with headers and body
            with e:
                try:
                    payload = e.read()
                except Exception:
                    payload = b""
                return e.code, e.headers or {}, payload

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_max, self.backoff_base * (2**attempt))

    def _retry_after(self, headers: Mapping[str, str], payload: bytes) -> float | None:
        """Seconds Discord asks us to wait: the JSON body's ``retry_after``, else the ``Retry-After`` header."""
        value: Any = None
        try:
            doc = json.loads(payload.decode("utf-8")) if payload else None
            if isinstance(doc, dict):
                value = doc.get("retry_after")
        except (ValueError, UnicodeDecodeError):
            pass
        if value is None and headers is not None:
            value = headers.get("Retry-After") or headers.get("X-RateLimit-Reset-After")
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            return None
        return min(max(seconds, 0.0), self.max_retry_after)

    def _note_rate_limit(self, headers: Mapping[str, str]) -> None:
        """When Discord says the bucket is empty, hold the next post until it resets (avoids a 429)."""
        try:
            if headers is not None and headers.get("X-RateLimit-Remaining") == "0":
                reset = float(headers.get("X-RateLimit-Reset-After") or 0.0)
                self._not_before = time.monotonic() + min(max(reset, 0.0), self.max_retry_after)
        except (TypeError, ValueError):
            pass

def _level_name(number: int) -> str:
    for name, value in sorted(LEVELS.items(), key=lambda kv: -kv[1]):
        if number >= value:
            return name
    return "debug"


def _secret_parts(url: str) -> list[str]:
    """The URL and the pieces that identify it (without scheme, the path with its token), longest first."""
    parts = {url, url.split("://", 1)[-1]}
    try:
        split = urllib.parse.urlsplit(url)
        if len(split.path) > 8:
            parts.add(split.path)
            token = split.path.rstrip("/").rsplit("/", 1)[-1]
            if len(token) >= 16:
                parts.add(token)
    except ValueError:
        pass
    return sorted((p for p in parts if p), key=len, reverse=True)
