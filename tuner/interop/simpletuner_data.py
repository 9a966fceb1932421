"""The data side of the SimpleTuner import (tuner/interop/simpletuner.py): the config's global dataset keys and each
backend of a multidatabackend.json, as ``data`` and ``data.datasets.<id>``."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from tuner.interop.simpletuner_common import (
    Imported,
    SimpleTunerError,
    _bool,
    _file,
    _floats,
    _int,
    _load_json,
    _locate,
    _put,
    _size,
    _strip,
    _take_secrets,
    expand,
    tried,
)
from tuner.interop.simpletuner_tables import GENERIC, REASONS

# dataset keys with the same name in tuner, global (data-level defaults) or per backend -> converter
DATA = {"resolution": _size, "crop": _bool, "crop_aspect_buckets": _floats, "repeats": _int, "probability": float}
DATA.update(is_regularisation_data=_bool, maximum_image_size=_size, target_downsample_size=_size)
CHOICES = {  # SimpleTuner's value -> tuner's
    "resolution_type": {"pixel": "pixel", "area": "area", "pixel_area": "area"},  # area: megapixels below 16
    "crop_style": {"center": "center", "centre": "center", "corner": "corner", "random": "random"},
    "crop_aspect": {"preserve": "preserve", "square": "square", "closest": "closest"},
    "caption_strategy": {
        "filename": "filename",
        "textfile": "textfile",
        "instanceprompt": "instanceprompt",
        "csv": "column",
    },
}
PROMPT_KEYS = ("instance_prompt", "prepend_instance_prompt", "only_instance_prompt")


def _dataset(entry: dict, res: Imported, prefix: str, label: str, inherited: dict) -> None:
    """One backend's dataset keys (or the config's global ones, as data-level defaults) under ``prefix``."""
    for key in [k for k in DATA if k in entry]:
        _put(res, label + key, f"{prefix}.{key}", DATA[key], entry.pop(key))
    for key, choices in [(k, v) for k, v in CHOICES.items() if k in entry]:
        value = str(entry.pop(key)).lower()
        if value in choices:
            res.set(f"{prefix}.{key}", choices[value])
        else:
            res.skip(label + key, f"{value!r}: tuner's are {', '.join(sorted(set(choices.values())))}")
    if "minimum_image_size" in entry:
        _minimum_size(entry.pop("minimum_image_size"), res, prefix, label)
    given = {k: entry.pop(k) for k in PROMPT_KEYS if k in entry}
    prompt, only, prepend = ({**inherited, **given}.get(k) for k in PROMPT_KEYS)
    strategy = res.get(f"{prefix}.caption_strategy") or res.get("data.caption_strategy")
    if _bool(only):
        res.set(f"{prefix}.caption_strategy", strategy := "instanceprompt")
    if prompt and (strategy == "instanceprompt" or _bool(prepend)):
        res.set(f"{prefix}.instance_prompt", str(prompt))
    elif prompt:
        why = "SimpleTuner uses it only with prepend_instance_prompt or instanceprompt; tuner would prepend it"
        res.skip(label + "instance_prompt", why)


def _minimum_size(value: Any, res: Imported, prefix: str, label: str) -> None:
    """tuner's minimum_image_size is the shorter edge in pixels; SimpleTuner's is in resolution_type units."""
    size, kind = float(value), res.get(f"{prefix}.resolution_type") or res.get("data.resolution_type")
    edge = round(size if kind == "pixel" or size >= 16 else math.sqrt(size * 1e6))  # below 16: megapixels
    res.set(f"{prefix}.minimum_image_size", edge)
    if kind != "pixel":
        res.notes.append(f"{label}minimum_image_size={size:g} ({kind}) -> {edge} px, the shorter edge: tuner's unit")


def _source(entry: dict, res: Imported, label: str, dirs: list[Path]) -> dict | None:
    """Where a backend's images are: a folder, ``s3://bucket/prefix/`` or a CSV table (None: not readable)."""
    kind = str(entry.pop("type", "local")).lower()
    if kind == "local" and entry.get("instance_data_dir"):
        return {"path": _file(res, label + "instance_data_dir", entry.pop("instance_data_dir"), dirs)}
    if kind == "aws" and entry.get("aws_bucket_name"):
        prefix = str(entry.pop("aws_data_prefix", "") or "").strip("/")
        source = {"path": f"s3://{entry.pop('aws_bucket_name')}/{prefix + '/' if prefix else ''}"}
        if entry.get("aws_endpoint_url"):
            source["endpoint_url"] = str(entry.pop("aws_endpoint_url"))
        if "aws_region_name" in entry:
            region = entry.pop("aws_region_name")
            res.skip(label + "aws_region_name", "set AWS_DEFAULT_REGION (or the AWS profile's region)", region)
        return source
    if kind == "csv" and entry.get("csv_file"):
        source = {"path": _file(res, label + "csv_file", entry.pop("csv_file"), dirs), "caption_strategy": "column"}
        for key, name in (("csv_url_column", "image_column"), ("csv_caption_column", "caption_column")):
            if key in entry:
                source[name] = str(entry.pop(key))
        return source
    if kind == "huggingface" and entry.get("dataset_name"):
        return _hub(entry, res, label)
    why = "tuner reads folders (local), S3 (aws), CSV (csv) and Hub datasets once downloaded (huggingface)"
    res.skip(label.rstrip(": "), f"type {kind} or no path key: {why}")
    return None


def _hub(entry: dict, res: Imported, label: str) -> dict:
    """A ``huggingface`` backend: tuner streams no Hub dataset, so its folder is where to download it, as the note
    says; the columns it names and the keys of its ``huggingface`` block that tuner has carry over."""
    repo, name = str(entry.pop("dataset_name")), label[len("backend ") : -len(": ")]
    block = entry.pop("huggingface", None)
    entry |= {k: v for k, v in (block or {}).items() if k in ("image_column", "caption_column")}
    folder, split = f"datasets/{name}", entry.pop("split", None)
    source = {"path": folder} | {key: str(entry.pop(key)) for key in ("image_column", "caption_column") if key in entry}
    for key in ("caption_strategy", "metadata_backend"):  # "huggingface": the table's columns, as above
        if str(entry.get(key)) == "huggingface":
            entry.pop(key)
    for key in sorted(set(block or {}) - {"image_column", "caption_column"}):
        res.skip(f"{label}huggingface.{key}", GENERIC)
    res.notes.append(
        f"{label}Hub dataset {repo!r}{f' (split {split})' if split else ''}: tuner does not stream it; download it "
        f"first: `hf download {repo} --repo-type dataset --local-dir {folder}`. tuner reads images with .txt "
        f"captions there, or a metadata table (.jsonl/.csv/.parquet naming image files: then set "
        f"data.datasets.{name}.path={folder}/<that table>); parquet shards holding the image bytes it cannot read"
    )
    return source


def _references(entries: list, res: Imported, dirs: list[Path]) -> dict[str, str]:
    """SimpleTuner's conditioning backends (Kontext's and the edit models' reference images), by id: their folder."""
    found = {}
    for raw in entries:
        entry = _strip(raw) if isinstance(raw, dict) else {}
        if str(entry.get("dataset_type")) != "conditioning" or not entry.get("instance_data_dir"):
            continue
        entry = expand(entry, {**res.placeholders, "id": str(entry.get("id", "") or "")})
        found[str(entry.get("id"))] = _locate(entry["instance_data_dir"], dirs) or str(entry["instance_data_dir"])
        if entry.get("conditioning_type") == "reference_loose":
            res.notes.append(f"backend {entry.get('id')}: reference_loose -> tuner crops a reference as its target")
    return found


def _link(links: Any, found: dict[str, str], res: Imported, name: str) -> None:
    """An image backend's ``conditioning_data`` (one id or several) -> its reference images' folder(s)."""
    ids = [links] if isinstance(links, str) else [str(i) for i in links or []]
    for missing in [i for i in ids if i not in found]:
        res.skip(f"backend {name}: conditioning_data", f"{missing!r} is no conditioning backend with a folder here")
    paths = [found[i] for i in ids if i in found]
    if paths:
        res.set(f"data.datasets.{name}.conditioning.reference.path", paths[0] if len(paths) == 1 else paths)
    if len(paths) > 1:
        res.notes.append(f"backend {name}: each target gets all {len(paths)} references (SimpleTuner's combined)")


def _backends(entries: list, res: Imported, dirs: list[Path], inherited: dict) -> list:
    """``data.datasets.<id>`` for each image backend; the cache folders they name."""
    caches, references = [], _references(entries, res, dirs)
    for number, raw in enumerate(entries):
        entry = _strip(raw if isinstance(raw, dict) else {})
        entry = expand(entry, {**res.placeholders, "id": str(entry.get("id", "") or "")})
        name = re.sub(r"[^A-Za-z0-9_-]", "_", str(entry.pop("id", f"dataset_{number}")))  # a YAML/Hydra key
        name = name if res.get(f"data.datasets.{name}") is None else f"{name}_{number}"
        label, kind = f"backend {name}: ", str(entry.pop("dataset_type", "image"))
        _take_secrets(entry, res, label)
        if kind in ("text_embeds", "image_embeds"):
            caches.append(entry.get("cache_dir"))
            res.skip(f"backend {name}", f"a {kind} cache: tuner caches embeddings itself, in data.cache_dir")
            continue
        if kind == "conditioning":
            res.skip(f"backend {name}", "reference images: data.datasets.<its image backend>.conditioning.reference")
            continue
        if kind != "image" or _bool(entry.pop("disabled", False)):
            why = "disabled in SimpleTuner" if kind == "image" else f"dataset_type {kind}: tuner trains on images only"
            res.skip(f"backend {name}", why)
            continue
        source = _source(entry, res, label, dirs)
        for key, value in (source or {}).items():
            res.set(f"data.datasets.{name}.{key}", value)
        if source:
            _link(entry.pop("conditioning_data", None), references, res, name)
            caches += [entry.pop("cache_dir_vae", None), entry.pop("csv_cache_dir", None)]
            _dataset(entry, res, f"data.datasets.{name}", label, inherited)
            for key in ("text_embeds", "image_embeds", "default"):  # links to the cache backends reported above
                entry.pop(key, None)
            for key, value in entry.items():
                res.skip(label + key, REASONS.get(key, GENERIC), value)
    return caches


def data_section(args: dict, res: Imported, dirs: list[Path], backend: str | None) -> None:
    """``data``: the config's own dataset keys and each image backend of its multidatabackend.json."""
    output_dir = str(res.get("output_dir") or Path.cwd() / ".simpletuner_output")  # SimpleTuner's when unset
    res.placeholders["output_dir"] = output_dir
    backend = backend or args.get("data_backend_config")
    args.pop("data_backend_config", None)
    found = _locate(backend, dirs) if backend else None
    if backend and not found:
        where = ", ".join(str(p) for p in tried(backend, dirs))
        res.skip("data_backend_config", f"{backend!r} is not found (tried: {where}): pass it with --backend FILE")
    inherited = {k: args.pop(k) for k in PROMPT_KEYS if k in args} if found else {}
    caches = [args.pop(k, None) for k in ("cache_dir_vae", "cache_dir", "cache_dir_text")]
    if args.get("instance_data_dir"):
        res.set("data.path", _file(res, "instance_data_dir", args.pop("instance_data_dir"), dirs))
    _dataset(args, res, "data", "", {})
    if found:
        entries = _load_json(Path(found), "data backend config")
        if isinstance(entries, dict) and isinstance(entries.get("datasets"), list):  # the WebUI's dataloader file
            entries = entries["datasets"]
        if not isinstance(entries, list):
            raise SimpleTunerError(f"{found}: a data backend config is a list of backends")
        res.sources.append(found)
        caches += _backends(entries, res, dirs, inherited)
    caches = list(dict.fromkeys(str(c) for c in caches if c))
    if caches:
        res.set("data.cache_dir", caches[0])
    for other in caches[1:]:
        res.notes.append(f"cache folder {other!r} -> data.cache_dir={caches[0]!r}: tuner keeps one, keyed on content")
    if not res.get("data.path") and not res.get("data.datasets"):
        res.notes.append("no dataset: add data.path=DIR when you run it (or import with --backend)")
