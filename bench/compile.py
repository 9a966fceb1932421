"""``model.compile=true`` against eager: ``python bench/compile.py [--family sdxl] [--steps 30] [--batch 4]``

Trains the tiny family's LoRA step by step (loss, backward, AdamW) on one fixed batch, eager and then compiled
in place (``nn.Module.compile``, inductor unless ``--backend``), each in a fresh module with the same seed. Prints
the steady-state step times (median after ``--warmup`` steps), their ratio, and the compile time (the compiled run's
first steps beyond the steady time: where dynamo traces and inductor builds). Inductor on the CPU builds C++ with
the system's compiler (g++ here).

``--smoke``: 3 steps through dynamo's eager backend, in seconds: the code path; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, compose_config


def build(family: str, work: Path, batch: int, compiled: bool, backend: str):
    """(module, batch, optimizer) for one run."""
    import torch

    from tuner.run import build_datamodule, build_module, ensure_demo_assets, prepare

    overrides = [
        f"model={family}", f"demo_assets_dir={work / 'demo'}", f"output_dir={work / 'out'}", "max_train_steps=100",
        "trainer.accelerator=cpu", f"data.batch_size={batch}", "data.caption_dropout_probability=0",
        "callbacks.ema.enabled=false", "callbacks.validation.enabled=false",
    ]
    if compiled:
        overrides += ["model.compile=true", f"model.compile_backend={backend}"]
    cfg = prepare(compose_config(overrides))
    ensure_demo_assets(cfg)
    torch.manual_seed(cfg.seed)
    module = build_module(cfg)
    (fixed,) = build_datamodule(cfg, work / "out").fixed_batches(1)
    return module, fixed, module.build_optimizer(100)["optimizer"]


def step_times(module, batch, optimizer, steps: int) -> list[float]:
    """Seconds of each training step (loss, backward, optimiser step)."""
    import torch

    times = []
    for step in range(steps):
        start = time.perf_counter()
        loss = module.compute_loss(batch, torch.Generator().manual_seed(step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sdxl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state median")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--smoke", action="store_true", help="3 steps, dynamo's eager backend: the code path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch, args.backend = 3, 1, 1, "eager"
    figures = {}
    with tempfile.TemporaryDirectory(prefix="compile.") as tmp:
        for label, compiled in (("eager", False), ("compiled", True)):
            module, batch, optimizer = build(args.family, Path(tmp), args.batch, compiled, args.backend)
            times = step_times(module, batch, optimizer, args.steps)
            steady = statistics.median(times[args.warmup:])
            figures[f"step_s_{label}"] = steady
            if compiled:
                figures["compile_s"] = sum(t - steady for t in times[: args.warmup])
            print(f"{label}: first step {times[0]:.2f} s, steady {steady * 1000:.1f} ms", flush=True)
    figures["compiled_over_eager"] = figures["step_s_compiled"] / figures["step_s_eager"]
    print(" ".join(f"{k}={v:.4f}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
