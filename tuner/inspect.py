"""`python -m tuner.inspect [overrides]`: the dataset doctor. Scans the data exactly as training
would (same config, same overrides), prints a report and writes ``<output_dir>/dataset_report.json``.
No model is loaded and nothing trains.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import Counter
from pathlib import Path

from hydra import compose, initialize_config_dir

from tuner.config import ConfigError, register, unknown_key_hint

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _reason_kind(reason: str) -> str:
    """'unreadable image: cannot identify…' -> 'unreadable image'; groups reasons for the summary."""
    return reason.split(":", 1)[0]


def report(datamodule, batch_size: int, world_size: int, accumulation: int) -> str:
    lines = []
    for name, result in datamodule.results.items():
        lines.append(f"dataset {name!r} ({datamodule.specs[name]['path']}):")
        lines.append(f"  usable {len(result.usable)}, skipped {len(result.skipped)}, read this time {result.probed}")
        for kind, n in Counter(_reason_kind(s["reason"]) for s in result.skipped).most_common():
            lines.append(f"    skipped, {kind}: {n}")
        for kind, pairs in result.pairs.items():  # paired data (datamodules/pairs.py)
            lines.append(
                f"  {kind}: {pairs.pairs} pairs, {len(pairs.missing)} images without one, "
                f"{len(pairs.orphans)} {kind} images without a target"
            )
    samples = datamodule.samples
    buckets = Counter(s.bucket for s in samples)
    lines.append("buckets (w x h: images):")
    for (w, h), n in sorted(buckets.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {w:>5} x {h:<5} {n:>6}  {'#' * max(1, round(40 * n / max(buckets.values())))}")
    clips = [s for s in samples if s.clip is not None]
    if clips:  # video: what the clips hold and what a sample takes of them
        seconds = sorted(s.clip.duration for s in clips)
        rates = sorted({round(s.clip.fps, 3) for s in clips})
        lines.append(
            f"clips: {len(clips)} of {len(samples)} samples; duration min {seconds[0]:.2f} s, median "
            f"{statistics.median(seconds):.2f} s, max {seconds[-1]:.2f} s; fps {', '.join(f'{r:g}' for r in rates)}; "
            f"{clips[0].num_frames} frames a sample ({clips[0].frame_sampling} window)"
        )
    words = [len(c.split()) for s in samples for c in s.captions]
    fallbacks = sum(r.caption_fallbacks for r in datamodule.results.values())
    lines.append(
        f"captions: {len(set(c for s in samples for c in s.captions))} distinct; words per caption "
        f"min {min(words)}, median {statistics.median(words):g}, max {max(words)}; "
        f"empty {sum(w == 0 for w in words)}; from file names for want of a caption file {fallbacks}"
    )
    # The very sampler training builds, so repeats and probability count as they will.
    per_rank = len(datamodule.make_sampler(rank=0, world_size=world_size))
    lines.append(
        f"steps per epoch: {math.ceil(per_rank / accumulation)} "
        f"({per_rank * world_size} batches of {batch_size}, {world_size} process(es), accumulation {accumulation})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from datamodules import EmptyDatasetError
    from tuner.run import build_datamodule, ensure_demo_assets, prepare

    overrides = list(sys.argv[1:] if argv is None else argv)
    register()
    hint = unknown_key_hint(overrides, CONF)
    if hint:
        print(f"tuner: error: {hint}", file=sys.stderr)
        return 2
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    try:
        cfg = prepare(cfg, require_steps=False)
        output_dir = Path(cfg.output_dir)
        if cfg.demo_assets_dir:
            ensure_demo_assets(cfg, pipeline=False)
        datamodule = build_datamodule(cfg, output_dir)
        datamodule.scan()
    except (ConfigError, EmptyDatasetError) as err:
        print(f"tuner: error: {err}", file=sys.stderr)
        return 2
    devices = cfg.trainer.devices
    if not isinstance(devices, int) or devices < 1:  # "auto" or -1: every visible GPU, else one process
        import torch

        devices = max(1, torch.cuda.device_count()) if str(cfg.trainer.accelerator) != "cpu" else 1
    print(report(datamodule, cfg.data.batch_size, devices * cfg.trainer.num_nodes, cfg.gradient_accumulation_steps))
    print(f"report: {output_dir / 'dataset_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
