"""The model card (``<output_dir>/README.md``) pushed to the Hub with the trained weights.

A card is what people see first on the Hub, so it carries what they need to use and judge the
weights: the base model, the trigger words, sample images, the training settings, the data and a
working diffusers snippet. It is rendered from a plain ``info`` dict (built by the run from its
config) so that this module depends on nothing but the file system.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

MISSING = "—"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# A key named like this never reaches the card, whatever its value (webhook_url, hf_token, s3 secret...).
_SECRET_KEY = re.compile(
    r"token(?!iz)|secret|passw|webhook|api[_-]?key|access[_-]?key|private[_-]?key|credential|authoriz", re.I
)
# Values that are secrets on their own: URLs with a token, a signature or user info, webhook URLs,
# Hugging Face tokens and AWS access key ids.
_SECRET_VALUE = re.compile(
    r"https?://[^\s]*(webhook|token|secret|sig=|signature|key=|passw)"
    r"|[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"
    r"|\bhf_[A-Za-z0-9]{16,}"
    r"|\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    re.I,
)


def drop_secrets(value: Any) -> Any:
    """A copy of ``value`` without secret-looking keys or values, so no caller can leak one by accident."""
    if isinstance(value, Mapping):
        return {
            k: drop_secrets(v) for k, v in value.items() if not _SECRET_KEY.search(str(k)) and not _is_secret_value(v)
        }
    if isinstance(value, (list, tuple)):
        return [drop_secrets(v) for v in value if not _is_secret_value(v)]
    return value


def _is_secret_value(value: Any) -> bool:
    return isinstance(value, str) and bool(_SECRET_VALUE.search(value))


def latest_validation_dir(output_dir: str | os.PathLike) -> Path | None:
    """The ``validation/step_<N>`` folder with the highest N, or None when validation never ran."""
    root = Path(output_dir) / "validation"
    try:
        names = os.listdir(root)
    except OSError:
        return None
    steps = [(int(m.group(1)), n) for n in names if (m := re.fullmatch(r"step_(\d+)", n)) and (root / n).is_dir()]
    return root / max(steps)[1] if steps else None


def validation_images(output_dir: str | os.PathLike) -> list[Path]:
    """Images of the latest validation step, sorted by name; the grid (if any) last."""
    folder = latest_validation_dir(output_dir)
    if folder is None:
        return []
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(images, key=lambda p: p.stem.lower() == "grid")


def write_model_card(output_dir: str | os.PathLike, info: dict | None) -> Path:
    """Write ``<output_dir>/README.md`` and return its path.

    ``info`` keys (all optional; a missing one shows as "—", secret-looking keys/values are dropped):

    - ``family`` (sd15, sdxl, flux, ...) and ``finetune`` (``lora`` | ``full``; default ``lora``)
    - ``base_model``: the Hub id or path the training started from
    - ``repo_id``: where the weights are published (the snippet loads from it; default: this folder)
    - ``title``, ``license`` (the family's declared licence; default ``other``), ``tags``
    - ``pipeline``: the family's diffusers pipeline class, for the loading snippet (default ``DiffusionPipeline``)
    - ``scheduler``: ``{"class_name", "changes"}``, what the snippet sets on the base model's scheduler for a
      LoRA (models/noise.py ``scheduler_change``); None when the base model's own fits
    - ``instance_prompt``: the trigger word/phrase; ``validation_prompts``: {image name: prompt}
    - ``steps``, ``epochs``, ``learning_rate``, ``lr_scheduler``, ``warmup_steps``, ``batch_size``,
      ``gradient_accumulation_steps``, ``mixed_precision``, ``optimizer``, ``lora_rank``, ``lora_alpha``,
      ``quantization`` (a string or {part: precision}), ``caption_dropout_probability`` (0-1)
    - ``datasets``: a list of dicts (or {name: dict}) with ``name``, ``images``, ``buckets``,
      ``resolution``, ``repeats``
    """
    output_dir = Path(output_dir)
    info = drop_secrets(dict(info or {}))
    images = validation_images(output_dir)
    text = "\n".join(
        [
            "---",
            yaml.safe_dump(_front_matter(info, images, output_dir), sort_keys=False, allow_unicode=True).rstrip(),
            "---",
            "",
            *_body(info, images, output_dir),
        ]
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _finetune(info: Mapping) -> str:
    return "full" if str(info.get("finetune") or "lora").lower() == "full" else "lora"


def _license(info: Mapping) -> str:
    # The run passes the family's declared licence (or callbacks.hub.license); "other" says "see the base model".
    return str(info.get("license") or "other")


def _is_hub_id(name: Any) -> bool:
    """A Hub model id (``org/name``), not a local folder: only those are valid as ``base_model`` metadata."""
    return (
        isinstance(name, str)
        and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None
        and not name.startswith(".")
        and not os.path.exists(name)
    )


def _prompt_for(info: Mapping, image: Path) -> str:
    prompts = info.get("validation_prompts")
    if isinstance(prompts, Mapping) and image.stem in prompts:
        return str(prompts[image.stem])
    return image.stem


def _front_matter(info: Mapping, images: list[Path], output_dir: Path) -> dict:
    # an edit model or a control LoRA turns an input image into another: image-to-image
    tags = [str(info.get("task") or "text-to-image"), "diffusers", "diffusers-training", _finetune(info)]
    if info.get("family"):
        tags.append(str(info["family"]))
    extra = info.get("tags") or []
    tags += [str(t) for t in ([extra] if isinstance(extra, str) else extra)]
    meta: dict[str, Any] = {}
    if _is_hub_id(info.get("base_model")):
        meta["base_model"] = info["base_model"]
    meta["tags"] = list(dict.fromkeys(tags))
    meta["license"] = _license(info)
    meta["library_name"] = "diffusers"
    meta["inference"] = True
    if info.get("instance_prompt"):
        meta["instance_prompt"] = str(info["instance_prompt"])
    widget = [
        {"text": _prompt_for(info, p), "output": {"url": p.relative_to(output_dir).as_posix()}}
        for p in images
        if p.stem.lower() != "grid"
    ]
    if widget:
        meta["widget"] = widget
    return meta


def _cell(value: Any) -> str:
    """A markdown table cell: "—" when unknown, pipes and newlines escaped."""
    if value is None or value == "" or value == [] or value == {}:
        return MISSING
    if isinstance(value, float):
        value = f"{value:g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _percent(value: Any) -> str:
    try:
        p = float(value)
    except (TypeError, ValueError):
        return MISSING
    return f"{p * 100 if p <= 1 else p:g}%"


def _short_name(value: Any) -> Any:
    """``torch.optim.AdamW`` -> ``AdamW``; a config-like mapping -> its ``_target_`` or ``name``."""
    if isinstance(value, Mapping):
        value = value.get("_target_") or value.get("name")
    if isinstance(value, str) and "." in value and " " not in value:
        return value.rsplit(".", 1)[-1]
    return value


def _quantisation(value: Any) -> Any:
    if isinstance(value, Mapping):
        parts = [f"{k.replace('_precision', '').replace('_', ' ')}: {v}" for k, v in value.items() if v is not None]
        return ", ".join(parts)
    return value


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _settings(info: Mapping) -> list[str]:
    if _finetune(info) == "lora":
        lora = f"rank {_cell(info.get('lora_rank'))}, alpha {_cell(info.get('lora_alpha', info.get('lora_rank')))}"
    elif _finetune(info) == "lycoris":
        lora = "LyCORIS " + ", ".join(f"{k} {v}" for k, v in dict(info.get("lycoris") or {}).items())
    else:
        lora = "full"
    rows = [
        ("Training steps", info.get("steps")),
        ("Epochs", info.get("epochs")),
        ("Learning rate", info.get("learning_rate")),
        ("Learning-rate schedule", _short_name(info.get("lr_scheduler"))),
        ("Warm-up steps", info.get("warmup_steps")),
        ("Batch size", info.get("batch_size")),
        ("Gradient accumulation steps", info.get("gradient_accumulation_steps")),
        ("Mixed precision", info.get("mixed_precision")),
        ("Optimiser", _short_name(info.get("optimizer"))),
        ("LoRA rank / alpha", lora),
        ("Quantisation", _quantisation(info.get("quantization"))),
        ("Caption dropout", _percent(info.get("caption_dropout_probability"))),
    ]
    return _table(["Setting", "Value"], rows)


def _datasets(info: Mapping) -> list[str]:
    datasets = info.get("datasets") or []
    if isinstance(datasets, Mapping):
        datasets = [{"name": k, **(v if isinstance(v, Mapping) else {})} for k, v in datasets.items()]
    rows = []
    for ds in datasets:
        ds = ds if isinstance(ds, Mapping) else {"name": ds}
        buckets = ds.get("buckets")
        if isinstance(buckets, (list, tuple)):
            buckets = ", ".join("x".join(map(str, b)) if isinstance(b, (list, tuple)) else str(b) for b in buckets)
        rows.append([ds.get("name", ds.get("id")), ds.get("images"), buckets, ds.get("resolution"), ds.get("repeats")])
    return _table(["Dataset", "Images", "Buckets", "Resolution", "Repeats"], rows or [[None] * 5])


def _snippet(info: Mapping) -> list[str]:
    base = info.get("base_model") or "BASE_MODEL"
    repo = info.get("repo_id") or "."
    prompt = info.get("instance_prompt") or "a photo"
    pipeline = info.get("pipeline") or "DiffusionPipeline"  # the family's own class, when known
    scheduler, set_scheduler = _scheduler(info)
    if _finetune(info) == "lora" and info.get("experts"):
        load = [f"pipe = {pipeline}.from_pretrained({base!r}, torch_dtype=torch.bfloat16)", *_experts(info, repo)]
    elif _finetune(info) in ("lora", "lycoris"):
        load = [f"pipe = {pipeline}.from_pretrained({base!r}, torch_dtype=torch.bfloat16)"]
        load.append((info.get("lora_load") or "pipe.load_lora_weights({path!r})").format(path=repo))
    else:
        load = [f"pipe = {pipeline}.from_pretrained({repo!r}, torch_dtype=torch.bfloat16)"]
    return [
        "```python",
        "import torch",
        f"from diffusers import {', '.join(dict.fromkeys([pipeline, *scheduler]))}",
        "",
        *load,
        *set_scheduler,
        'pipe.to("cuda")',
        f"image = pipe(prompt={prompt!r}).images[0]",  # by name: FLUX.2's pipelines take an image first
        'image.save("output.png")',
        "```",
    ]


def _scheduler(info: Mapping) -> tuple[list[str], list[str]]:
    """The scheduler class to import and the lines that give the base model's pipeline the scheduler the run
    validated with (``info["scheduler"]``: ``{"class_name", "changes"}``), for weights loaded onto the base
    model; a full fine-tune's own pipeline already carries it."""
    spec = info.get("scheduler")
    if not isinstance(spec, Mapping) or not spec.get("class_name") or _finetune(info) == "full":
        return [], []
    name = str(spec["class_name"])
    args = "".join(f", {k}={v!r}" for k, v in sorted(dict(spec.get("changes") or {}).items()))
    return [name], [
        "# the scheduler this model was trained for and validated with (the base model's own does not fit it)",
        f"pipe.scheduler = {name}.from_config(pipe.scheduler.config{args})",
    ]


def _experts(info: Mapping, repo: str) -> list[str]:
    """Loading a two-expert run's LoRAs, one adapter each, and switching between them by the timestep the
    pipeline passes its denoiser (what tuner's validation does)."""
    experts = info["experts"]
    if experts.get("denoisers"):  # an expert per denoiser (Wan 2.2 A14B): its pipeline switches between them itself
        return [
            f'pipe.load_lora_weights({repo!r}, weight_name="pytorch_lora_weights_{expert}.safetensors"'
            + ("" if denoiser == experts.get("denoiser") else f", load_into_{denoiser}=True") + ")"
            for expert, denoiser in experts["denoisers"].items()
        ] + [f"# the pipeline hands each step to {' or '.join(experts['denoisers'].values())} by its boundary_ratio "
             f"({experts['boundary']} of the schedule)"]
    if (info.get("lora_load") or "pipe.load_lora_weights({path!r})") != "pipe.load_lora_weights({path!r})":
        return ["# one LoRA per expert: pytorch_lora_weights_high_noise / _low_noise; load each as this family's LoRA"]
    scale = experts.get("timestep_scale")
    unit = repr(scale) if scale else "pipe.scheduler.config.num_train_timesteps"
    lines = [
        f'pipe.load_lora_weights({repo!r}, weight_name="pytorch_lora_weights_{name}.safetensors", adapter_name="{name}")'
        for name in ("high_noise", "low_noise")
    ]
    return [
        *lines,
        f"boundary = {experts['boundary']} * {unit}  # the experts' split, in the denoiser's timesteps",
        "",
        "def pick_expert(module, args, kwargs):  # each step's timestep decides which expert denoises it",
        '    t = torch.as_tensor(kwargs.get("timestep", args[1] if len(args) > 1 else None))',
        '    pipe.set_adapters("low_noise" if float(t.flatten()[0]) < boundary else "high_noise")',
        "",
        f"pipe.{experts.get('denoiser') or 'unet'}.register_forward_pre_hook(pick_expert, with_kwargs=True)",
    ]


def _body(info: Mapping, images: list[Path], output_dir: Path) -> list[str]:
    kind = {"lora": "LoRA", "lycoris": "LyCORIS"}.get(_finetune(info), "Full fine-tune")
    base = info.get("base_model")
    title = info.get("title") or info.get("repo_id") or f"{kind} for {base or 'a diffusion model'}"
    lines = [
        f"# {title}",
        "",
        f"{kind} of `{base or MISSING}` ({info.get('family') or MISSING}), trained with tuner.",
        "",
    ]
    lines += ["## Trigger words", ""]
    if info.get("instance_prompt"):
        lines.append(f"Use `{info['instance_prompt']}` in the prompt to trigger what was trained.")
    else:
        lines.append(f"Instance prompt: {MISSING}")
    lines += ["", "## Validation images", ""]
    if images:
        lines.append(f"From `{images[0].parent.name}`:")
        lines.append("")
        rows = []
        for p in images:
            rel = p.relative_to(output_dir).as_posix()
            rows.append([_prompt_for(info, p), f"![{p.stem}]({rel})"])
        lines += _table(["Prompt", "Image"], rows)
    else:
        lines.append(MISSING)
    if info.get("license_note"):
        lines += ["", "## Licence", "", str(info["license_note"])]
    if info.get("family_notes"):
        lines += ["", "## Notes", ""]
        for note in info["family_notes"]:
            lines += [str(note), ""]
        lines.pop()
    lines += ["", "## Training settings", "", *_settings(info), "", "## Datasets", "", *_datasets(info)]
    lines += ["", "## Inference", "", *_snippet(info), ""]
    return lines
