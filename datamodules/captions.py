"""Captions: from the file name, a ``.txt`` sidecar, or the instance prompt."""

from __future__ import annotations

import codecs
import re
from pathlib import Path

CAPTION_STRATEGIES = ("filename", "textfile", "instanceprompt", "column")

_COPY_SUFFIX = re.compile(r"\s*\(\d+\)$")  # "photo (1)" from a browser's duplicate download


def caption_from_filename(path: Path) -> str:
    """'a_red-cube (1).jpg' -> 'a red-cube'."""
    name = _COPY_SUFFIX.sub("", path.stem.replace("_", " "))
    return " ".join(name.split())


def decode_text(raw: bytes) -> str:
    """Caption file bytes to text: UTF-8 (with or without BOM), UTF-16 (BOM or NUL-laced), else the
    legacy Windows code page cp1252, else Latin-1. Raises UnicodeError for what is not text."""
    text = _decode(raw)
    if any(not (c.isprintable() or c in "\r\n\t") for c in text):
        raise UnicodeError("not a text file (control characters)")
    return text


def _decode(raw: bytes) -> str:
    if raw.startswith(codecs.BOM_UTF8):
        return raw[3:].decode("utf-8")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    if raw.count(b"\x00") * 3 >= len(raw):
        # UTF-16 without a BOM (Notepad's "Unicode"): about half of its bytes are NUL, not just a few.
        even_nuls = raw[0::2].count(b"\x00")
        text = raw.decode("utf-16-be" if even_nuls > raw[1::2].count(b"\x00") else "utf-16-le", errors="strict")
        return text
    raw = raw.replace(b"\x00", b"")  # stray NULs (a padded write) carry no text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:
            return raw.decode("latin-1")


def caption_for(
    path: Path,
    strategy: str,
    instance_prompt: str | None,
    sidecar: bytes | None = None,
    carried: str | None = None,
    multiline: bool = True,
) -> tuple[tuple[str, ...], bool]:
    """(captions, fell_back): the image's caption(s) by ``strategy``, each with ``instance_prompt``
    prepended as a trigger word.

    ``path`` names the image (for ``filename``); ``sidecar`` holds its ``.txt`` bytes, if any; ``carried``
    is the caption a metadata table gives it (for ``column``). A sidecar with several non-empty lines
    gives one caption per line (one is drawn per use) unless ``multiline`` is off, when its lines are
    joined into one. ``fell_back`` is true when ``textfile`` or ``column`` found nothing and the file
    name was used instead.
    """
    fell_back = False
    if strategy == "instanceprompt":
        if not instance_prompt:
            raise ValueError("caption_strategy=instanceprompt needs data.instance_prompt")
        return (instance_prompt,), False
    if strategy == "textfile":
        text = None if sidecar is None else decode_text(sidecar)
    elif strategy == "column":
        text = carried
    elif strategy == "filename":
        text = caption_from_filename(path)
    else:
        raise ValueError(f"unknown caption_strategy {strategy!r}; valid: {', '.join(CAPTION_STRATEGIES)}")
    if text is None:
        text, fell_back = caption_from_filename(path), True
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    captions = (tuple(lines) if multiline else (" ".join(lines),)) if lines else ("",)
    if instance_prompt:
        captions = tuple(f"{instance_prompt}, {c}" if c else instance_prompt for c in captions)
    return captions, fell_back
