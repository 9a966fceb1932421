"""How a webhook message is put on the wire, for each ``webhook_type`` (see ``callbacks.webhook_sender``)."""

from __future__ import annotations

import base64
import json
import re
import uuid
from pathlib import Path

DISCORD_CONTENT_LIMIT = 2000


def encode(config, message) -> tuple[bytes, str]:
    """A message as the POST body and its content type, for ``config.webhook_type``."""
    prefix = config.message_prefix
    if config.webhook_type == "raw":
        doc = {
            "level": message.level,
            "message": message.text,
            "prefix": prefix,
            "images": [
                {
                    "filename": n,
                    "content_type": _content_type(b),
                    "data_base64": base64.b64encode(b).decode("ascii"),
                }
                for n, b in message.images
            ],
        }
        return json.dumps(doc).encode("utf-8"), "application/json"

    content = f"{prefix}: {message.text}" if prefix else message.text
    if len(content) > DISCORD_CONTENT_LIMIT:
        content = content[: DISCORD_CONTENT_LIMIT - 1] + "…"
    doc = {"content": content, "allowed_mentions": {"parse": []}}
    if not message.images:
        return json.dumps(doc).encode("utf-8"), "application/json"

    names = _unique_filenames([n for n, _ in message.images])
    doc["attachments"] = [{"id": i, "filename": n} for i, n in enumerate(names)]
    boundary = f"tuner-{uuid.uuid4().hex}"
    parts = [
        _form_part(boundary, 'name="payload_json"', "application/json", json.dumps(doc).encode("utf-8")),
    ]
    for i, (name, (_, data)) in enumerate(zip(names, message.images, strict=True)):
        parts.append(_form_part(boundary, f'name="files[{i}]"; filename="{name}"', _content_type(data), data))
    body = b"".join(parts) + f"--{boundary}--\r\n".encode("ascii")
    return body, f"multipart/form-data; boundary={boundary}"


def _content_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _unique_filenames(names: list[str]) -> list[str]:
    """Header-safe ASCII file names, unique within one message (Discord keys attachments by name)."""
    out: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        clean = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._") or f"image_{i}"
        clean = clean[:80]
        if "." not in clean:
            clean += ".png"
        stem, dot, ext = clean.rpartition(".")
        candidate, n = clean, 1
        while candidate in seen:
            candidate = f"{stem}_{n}{dot}{ext}"
            n += 1
        seen.add(candidate)
        out.append(candidate)
    return out


def _form_part(boundary: str, disposition: str, content_type: str, data: bytes) -> bytes:
    head = f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\nContent-Type: {content_type}\r\n\r\n"
    return head.encode("ascii") + data + b"\r\n"
