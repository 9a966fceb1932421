"""Captions: from the file name, a ``.txt`` sidecar, or the instance prompt."""

from __future__ import annotations

import re
from pathlib import Path

CAPTION_STRATEGIES = ("filename", "textfile", "instanceprompt")

_COPY_SUFFIX = re.compile(r"\s*\(\d+\)$")  # "photo (1)" from a browser's duplicate download


def caption_from_filename(path: Path) -> str:
    """'a_red-cube (1).jpg' -> 'a red-cube'."""
    name = _COPY_SUFFIX.sub("", path.stem.replace("_", " "))
    return " ".join(name.split())


def read_sidecar(path: Path) -> str | None:
    """The first non-empty line of ``<image>.txt``, or None when there is no sidecar."""
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    raw = sidecar.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")  # legacy Windows-encoded captions
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def caption_for(path: Path, strategy: str, instance_prompt: str | None) -> tuple[str, bool]:
    """(caption, fell_back): the caption by ``strategy``, with ``instance_prompt`` prepended as a trigger.

    ``fell_back`` is true when ``textfile`` found no sidecar and used the file name instead.
    """
    fell_back = False
    if strategy == "instanceprompt":
        if not instance_prompt:
            raise ValueError("caption_strategy=instanceprompt needs data.instance_prompt")
        return instance_prompt, False
    if strategy == "textfile":
        caption = read_sidecar(path)
        if caption is None:
            caption, fell_back = caption_from_filename(path), True
    elif strategy == "filename":
        caption = caption_from_filename(path)
    else:
        raise ValueError(f"unknown caption_strategy {strategy!r}; valid: {', '.join(CAPTION_STRATEGIES)}")
    if instance_prompt:
        caption = f"{instance_prompt}, {caption}" if caption else instance_prompt
    return caption, fell_back
