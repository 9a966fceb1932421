"""Paired-data and video settings against what the family consumes, checked before anything loads (from
``tuner.config.families.check_family``): a family that trains on (target, reference) pairs needs references; a
control image or a reference goes only to a family that reads it; a mask goes with ``model.masked_loss``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from datamodules.spec import CONDITIONING_KINDS

DEMO_REFERENCES = "references"  # under demo_assets_dir: one input image per demo image (datamodules/demo.py)
DEMO_CLIPS = "clips"  # under demo_assets_dir: the video families' demo, clips and two stills


def _given(keys) -> dict[str, list[str]]:
    """``{"path" | "column": [values]}`` of one kind's settings, only those set."""
    out = {}
    for by in ("path", "column"):
        value = (keys or {}).get(by)
        if value is not None:
            out[by] = (
                [str(v) for v in value] if isinstance(value, Sequence) and not isinstance(value, str) else [str(value)]
            )
    return out


def dataset_settings(cfg) -> dict[str, tuple[str, dict, bool]]:
    """Each dataset's (where its keys are, its conditioning, mask_from_alpha), entries over the data level."""
    data = cfg.data
    level = (data.get("conditioning") or {}, bool(data.get("mask_from_alpha")))
    if not data.datasets:
        return {"default": ("data", *level)}
    out = {}
    for name, entry in data.datasets.items():
        conditioning = entry.get("conditioning")
        alpha = entry.get("mask_from_alpha")
        where = f"data.datasets.{name}" if conditioning is not None else "data"
        out[name] = (
            where,
            conditioning if conditioning is not None else level[0],
            level[1] if alpha is None else alpha,
        )
    return out


def wire_demo_references(cfg, cls) -> None:
    """The built-in demo of an edit family (or a control LoRA) trains on the demo's pairs: its images, and the
    input images ``datamodules/demo.py`` writes beside them (a run on the user's own data names its own)."""
    demo = cfg.get("demo_assets_dir")
    kind = next((k for k in ("reference", "control") if k in cls.conditioning_kinds), None)
    if not demo or kind is None or cfg.data.datasets:
        return
    if cfg.data.path and Path(cfg.data.path) == Path(demo) / "images" and not _given(cfg.data.conditioning[kind]):
        from datamodules.demo import image_names

        cfg.data.conditioning[kind].path = str(Path(demo) / DEMO_REFERENCES)  # the mirrored images serve either
        val = cfg.callbacks.validation
        if not val.inputs and not val.prompt_library:  # each prompt's input: a demo pair of its caption
            names = image_names()
            picked = [next((n for n in names if n.startswith(f"{p} (")), names[0]) for p in val.prompts]
            val.inputs = [str(Path(demo) / DEMO_REFERENCES / n) for n in picked]


def wire_demo_clips(cfg, cls) -> None:
    """The built-in demo of a video family trains on the demo's clips (and two stills beside them) instead of its
    images, at a frame count the family takes (9 frames for Wan and LTX) and a bucket step its VAE takes."""
    demo = cfg.get("demo_assets_dir")
    if not demo or not cls.video or cfg.data.datasets or not cfg.data.path:
        return
    if Path(cfg.data.path) == Path(demo) / "images":
        cfg.data.path = str(Path(demo) / DEMO_CLIPS)
        if cfg.data.num_frames is None:
            cfg.data.num_frames = cls.frame_multiple * max(1, 8 // cls.frame_multiple) + 1
        if cfg.data.bucket_step % cls.pixel_multiple:  # the tiny preset's 16 px, for a VAE of 32x (LTX)
            cfg.data.bucket_step = math.lcm(cfg.data.bucket_step, cls.pixel_multiple)


def check_paired(cfg, cls) -> None:
    """Raises ConfigError naming the key when the paired-data settings do not fit the family."""
    from tuner.config import ConfigError, suggest

    family, masked = cfg.model.family, bool(cfg.model.get("masked_loss"))
    for _name, (where, conditioning, alpha) in dataset_settings(cfg).items():
        for kind in conditioning:
            if kind not in CONDITIONING_KINDS:
                raise ConfigError(
                    f"unknown config key '{where}.conditioning.{kind}'.{suggest(str(kind), list(CONDITIONING_KINDS))}"
                )
        given = {kind: _given(conditioning.get(kind)) for kind in CONDITIONING_KINDS}
        for kind, settings in given.items():
            if len(settings) > 1:
                raise ConfigError(f"{where}.conditioning.{kind}: set path or column, not both")
        for kind in ("reference", "control"):
            if given[kind] and kind not in cls.conditioning_kinds:
                takers = _families_taking(kind)
                raise ConfigError(
                    f"{where}.conditioning.{kind} is set, but model={family} does not take {kind} images"
                    f" (families that do: {', '.join(takers) or 'none'})"
                )
        for kind in cls.conditioning_kinds:
            if not given[kind]:
                raise ConfigError(
                    f"model={family} trains on (target, {kind}) pairs: set {where}.conditioning.{kind}.path to a "
                    f"folder of {kind} images with the targets' relative paths and stems (or .column for a table)"
                )
        count = sum(len(v) for v in given["reference"].values())
        if count > (most := cls.max_references_for(cfg.model)):
            raise ConfigError(
                f"{where}.conditioning.reference lists {count} references a target; model={family} with "
                f"{cfg.model.pretrained_model_name_or_path} takes at most {most}"
            )
        has_mask = bool(given["mask"]) or alpha
        if given["mask"] and alpha:
            raise ConfigError(f"{where}: conditioning.mask and mask_from_alpha=true are both set; choose one")
        if masked and not has_mask:
            raise ConfigError(
                f"model.masked_loss=true needs a mask for every image: set {where}.conditioning.mask.path (white = "
                f"train) or {where}.mask_from_alpha=true"
            )
        if has_mask and not masked:
            what = "conditioning.mask" if given["mask"] else "mask_from_alpha=true"
            raise ConfigError(f"{where}.{what} gives masks, but model.masked_loss is false: set model.masked_loss=true")
    val = cfg.callbacks.validation
    if cls.conditioning_kinds and val.enabled and (val.prompts or val.prompt_library) and not val.inputs:
        raise ConfigError(
            f"model={family} samples from an input ({' or '.join(cls.conditioning_kinds)}) image: set "
            "callbacks.validation.inputs to one image path per validation prompt"
        )


def _families_taking(kind: str) -> list[str]:
    from tuner.config.families import families, family_class

    return [f for f in families() if kind in family_class(f).conditioning_kinds]


def check_frames(cfg, cls) -> None:
    """``data.num_frames`` (and each dataset's) against the family: a video family's frame multiple; an image
    family takes none."""
    from tuner.config import ConfigError

    family = cfg.model.family
    given = {"data.num_frames": cfg.data.get("num_frames")}
    given.update({f"data.datasets.{k}.num_frames": v.get("num_frames") for k, v in cfg.data.datasets.items()})
    for key, frames in given.items():
        if frames is None:
            continue
        if not cls.video and frames > 1:
            raise ConfigError(f"{key}={frames}, but model={family} trains on images (one frame)")
        if frames < 1 or (frames - 1) % cls.frame_multiple:
            m = cls.frame_multiple
            raise ConfigError(f"{key}={frames}; model={family} takes {m}k+1 frames (e.g. {m * 4 + 1} or {m * 20 + 1})")
    # a family whose positions in time are conditioned on the frame rate (LTX-Video) trains at the rate it is told
    conditioned = getattr(cls.Options(), "frame_rate", None)
    if conditioned is not None:
        told = float((cfg.model.get("options") or {}).get("frame_rate") or conditioned)
        rates = {"data.frame_rate": cfg.data.get("frame_rate")}
        rates.update({f"data.datasets.{k}.frame_rate": v.get("frame_rate") for k, v in cfg.data.datasets.items()})
        for key, rate in rates.items():
            if rate is not None and abs(float(rate) - told) > 1e-6:
                raise ConfigError(
                    f"{key}={rate:g}, but model.options.frame_rate={told:g}: {family} conditions its positions in time "
                    "on the frame rate, so the clips must come at it; set the two equal"
                )
