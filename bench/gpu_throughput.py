"""Training throughput and peak VRAM on a CUDA GPU: tuner against a plain loop doing the same math.

Cases (``--cases``, all by default):

- ``sdxl``: SDXL LoRA (rank 16), 4 x 1024², bf16, gradient checkpointing off;
- ``sdxl_gc``: the same with gradient checkpointing on;
- ``flux_int8``: Flux.1 [dev] LoRA (rank 16), 1 x 1024², bf16, transformer in int8 (optimum-quanto),
  gradient checkpointing on (the flux-dev preset's settings, with torch's AdamW on both sides).

The denoisers have their real shapes and random weights (bench/sdxl_shapes.py, bench/flux_shapes.py). Each
is written into a pipeline folder in the real on-disk layout (``python -m tuner.tiny``'s pipeline with the
denoiser swapped), which both sides load with ``from_pretrained``. The VAE and text encoders there are the
tiny ones and never run: both sides train from the batch tuner's latent and text-embedding caches produce
(the VAE posterior of 1024² images, prompt embeddings of the real widths), the same CPU tensors each step.

tuner runs its real training path: the config composed from the family's preset, ``tuner.run.build_module``
and ``build_trainer`` (Lightning's loop, bf16-mixed, clipping, LR schedule, logging, the export callback),
with a callback that times the steps. The plain loop is bench/gpu_plain_loop.py. Both take the same
warm-up steps, then time the same number of steps from one step's start to the next, with
``torch.cuda.synchronize()`` at each mark; peak VRAM is ``torch.cuda.max_memory_allocated()`` over the
measured steps (reset after warm-up). Each side of each case runs in a fresh process.

    python bench/gpu_throughput.py [--cases sdxl,sdxl_gc,flux_int8] [--warmup 5] [--steps 20] [--workdir DIR]
    python bench/gpu_throughput.py --smoke   # the code path on CPU with the tiny pipelines, 2 steps, sdxl_gc and flux_int8

The last line is ``key=value`` pairs (ratios are tuner / plain). Exit status: 0 when every case ran, 1 when
one failed (its figures are ``nan``), 77 without a CUDA GPU (and without ``--smoke``): nothing was measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

NO_CUDA = 77  # the conventional "skipped" status
HP = dict(rank=16, lr=1e-4, weight_decay=1e-2, lr_warmup_steps=0, max_grad_norm=1.0, guidance=1.0)


@dataclasses.dataclass(frozen=True)
class Case:
    family: str  # sdxl | flux
    preset: str  # tuner's preset for the family
    batch: int
    checkpointing: bool
    quantization: str  # tuner's quantization group: none | int8-quanto
    about: str


CASES = {
    "sdxl": Case("sdxl", "sdxl", 4, False, "none", "SDXL LoRA r16, bf16, no gradient checkpointing"),
    "sdxl_gc": Case("sdxl", "sdxl", 4, True, "none", "SDXL LoRA r16, bf16, gradient checkpointing"),
    "flux_int8": Case(
        "flux", "flux-dev", 1, True, "int8-quanto", "Flux LoRA r16, int8 transformer, bf16, gradient checkpointing"
    ),
}
DENOISER = {"sdxl": "unet", "flux": "transformer"}
PROMPT_TOKENS = {"sdxl": 77, "flux": 512}  # CLIP's length; T5's for Flux dev (its preset's t5_max_length)


# ---- pipelines and the batch ----------------------------------------------------------------------
def write_pipeline(family: str, workdir: Path, smoke: bool, flux_blocks: tuple[int, int]) -> Path:
    """The tiny pipeline (``--smoke``), or the tiny one with a real-shape random denoiser swapped in."""
    from models.tiny import write_pipeline as write
    from tuner.config.families import family_class, write_tiny

    if smoke:
        return write_tiny(family, workdir / f"{family}-tiny")
    if family == "sdxl":
        path = workdir / "sdxl-real-shape"
    else:
        path = workdir / f"flux-real-shape-{flux_blocks[0]}x{flux_blocks[1]}"

    def build():
        from flux_shapes import flux_transformer
        from sdxl_shapes import sdxl_unet

        pipe = family_class(family).tiny_pipeline(family)
        if family == "sdxl":
            denoiser = sdxl_unet(torch.bfloat16)
        else:
            denoiser = flux_transformer(torch.bfloat16, *flux_blocks)
        pipe.register_modules(**{DENOISER[family]: denoiser})
        return pipe

    if not (path / "model_index.json").exists():
        print(f"writing {path} (random weights, real shapes; once per --workdir)", flush=True)
    return write(build, path)


def _config(pipeline: Path, sub: str) -> dict:
    return json.loads((pipeline / sub / "config.json").read_text())


def make_batch(family: str, pipeline: Path, batch: int, resolution: int, seed: int = 0) -> dict:
    """What tuner's caches hand its training step: ``encoded`` (B, 2C, H/8, W/8), the VAE posterior's
    mean and log-variance; ``cond``: prompt embeddings (B, L, D) and pooled ones (B, P), in fp32 as the
    cache stores them; SDXL's size and crop micro-conditioning. Shapes come from the pipeline's configs."""
    vae, den = _config(pipeline, "vae"), _config(pipeline, DENOISER[family])
    side = resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    if family == "sdxl":
        width = den["cross_attention_dim"]
        pooled = den["projection_class_embeddings_input_dim"] - 6 * den["addition_time_embed_dim"]
    else:
        width, pooled = den["joint_attention_dim"], den["pooled_projection_dim"]
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(batch, vae["latent_channels"], side, side, generator=g)
    size = torch.tensor([[resolution, resolution]] * batch)
    return {
        "captions": ["a photo"] * batch,
        "encoded": torch.cat([mean, torch.full_like(mean, -6.0)], dim=1),  # log-variance -6: std 0.05
        "cond": {
            "prompt_embeds": torch.randn(batch, PROMPT_TOKENS[family], width, generator=g),
            "pooled": torch.randn(batch, pooled, generator=g),
        },
        "original_size": size,
        "crop_top_left": torch.zeros(batch, 2, dtype=torch.long),
        "target_size": size.clone(),
        "is_regularisation": torch.zeros(batch, dtype=torch.bool),
    }


# ---- timing -----------------------------------------------------------------------------------------
class Clock:
    """Marks at the start of each measured step and once after the last; the first mark resets the peak
    memory statistics, the last reads them. On CUDA every mark waits for the GPU first."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[float] = []
        self.peak_gib = self.reserved_gib = math.nan

    def mark(self, last: bool = False) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())
        if self.cuda and len(self.marks) == 1:
            torch.cuda.reset_peak_memory_stats()
        if self.cuda and last:
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30
            self.reserved_gib = torch.cuda.max_memory_reserved() / 2**30

    def figures(self) -> dict:
        steps = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return {
            "it_s": len(steps) / (self.marks[-1] - self.marks[0]),
            "median_ms": statistics.median(steps) * 1e3,
            "peak_gib": self.peak_gib,
            "reserved_gib": self.reserved_gib,
        }


def backend_flags() -> dict:
    """Settings that change kernel choice; the two sides must agree on them."""
    return {
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


# ---- the two sides (each in its own process) ------------------------------------------------------------
def tuner_side(case: Case, pipeline: Path, args, device: torch.device, out: Path) -> dict:
    import lightning as L
    from common import compose_config
    from torch.utils.data import DataLoader

    from tuner.run import build_module, build_trainer, prepare

    cfg = compose_config(
        [
            f"preset={case.preset}",
            f"model.pretrained_model_name_or_path={pipeline}",
            f"data.path={pipeline}",  # must be set; never read (batches come from the loader below)
            f"output_dir={out}",
            f"max_train_steps={args.warmup + args.steps + 1}",  # the extra step closes the last interval
            "checkpointing_steps=0",
            "mixed_precision=bf16",
            f"max_grad_norm={HP['max_grad_norm']}",
            f"data.batch_size={case.batch}",
            f"data.resolution={args.resolution}",
            "data.caption_dropout_probability=0",
            f"model.lora.rank={HP['rank']}",
            f"model.gradient_checkpointing={case.checkpointing}",
            f"quantization={case.quantization}",
            "optimizer=adamw",
            f"optimizer.lr={HP['lr']}",
            f"optimizer.weight_decay={HP['weight_decay']}",
            "lr_scheduler=constant",
            f"lr_scheduler.warmup_steps={HP['lr_warmup_steps']}",
            f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
            "trainer.enable_progress_bar=false",
        ]
        + ([f"model.options.guidance={HP['guidance']}"] if case.family == "flux" else [])
    )
    cfg = prepare(cfg)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a reused --workdir: no earlier run's checkpoints
    module = build_module(cfg)
    trainer = build_trainer(cfg, Path(cfg.output_dir))
    clock = Clock(device)
    first, last = args.warmup, args.warmup + args.steps

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if first <= batch_idx <= last:
                clock.mark(last=batch_idx == last)

    trainer.callbacks.append(StepClock())
    batch = make_batch(case.family, pipeline, case.batch, args.resolution)
    loader = DataLoader([batch] * cfg.max_train_steps, batch_size=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(eval mode|does not have many workers|not resumable).*")
        trainer.fit(module, train_dataloaders=loader)
    loss = trainer.callback_metrics.get("train/loss_step")
    return {**clock.figures(), "loss": float(loss) if loss is not None else math.nan, "trainable": module.n_trainable}


def plain_side(case: Case, pipeline: Path, args, device: torch.device, out: Path) -> dict:
    from gpu_plain_loop import PlainLoop

    loop = PlainLoop(pipeline, case.family, device, case.quantization == "int8-quanto", case.checkpointing, HP)
    batch = make_batch(case.family, pipeline, case.batch, args.resolution)
    clock = Clock(device)
    for i in range(args.warmup + args.steps):
        if i >= args.warmup:
            clock.mark()
        loss = loop.step(batch)
    clock.mark(last=True)
    return {**clock.figures(), "loss": loss, "trainable": sum(p.numel() for p in loop.params)}


def worker(args) -> None:
    """One side of one case; writes its figures as JSON to ``--result``."""
    import logging

    from tuner.runtime.console import quiet_third_parties

    quiet_third_parties()
    logging.disable(logging.WARNING)
    if args.smoke:
        torch.set_num_threads(1)
    device = torch.device("cpu" if args.smoke else "cuda")
    case, pipeline, result = CASES[args.case], Path(args.pipeline), Path(args.result)
    side = tuner_side if args.worker == "tuner" else plain_side
    figures = side(case, pipeline, args, device, result.parent / f"{args.case}-{args.worker}")
    figures["flags"] = backend_flags()
    figures["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    result.write_text(json.dumps(figures))


# ---- the parent -----------------------------------------------------------------------------------------
def run_side(side: str, name: str, pipeline: Path, args, workdir: Path) -> dict | None:
    result = workdir / f"{name}-{side}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", side, "--case", name, "--pipeline", str(pipeline)]
    cmd += ["--result", str(result), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--resolution", str(args.resolution)]
    cmd += ["--smoke"] if args.smoke else []
    env = {**os.environ, "TUNER_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1", "TUNER_HOME": str(workdir / "home")}
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"
    env.pop("TUNER_RUN_ID", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result.exists():
        tail = "\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        print(f"  {side}: failed (exit {proc.returncode}):\n    {tail}", flush=True)
        return None
    return json.loads(result.read_text())


def _line(side: str, r: dict) -> str:
    return (
        f"  {side:5s} {r['it_s']:.3f} it/s, median step {r['median_ms']:.1f} ms, peak {r['peak_gib']:.2f} GiB "
        f"(reserved {r['reserved_gib']:.2f}), last loss {r['loss']:.4f}, {r['trainable']:,} trainable"
    )


def compare(name: str, tuner: dict | None, plain: dict | None) -> dict[str, float]:
    """Print both sides' figures and what does not match; return the case's key=value figures."""
    nan = {"it_s": math.nan, "peak_gib": math.nan}
    for side, r in (("tuner", tuner), ("plain", plain)):
        if r is not None:
            print(_line(side, r))
    if tuner or plain:
        print(f"  on {(tuner or plain)['device']}")
    if tuner and plain:
        if tuner["trainable"] != plain["trainable"]:
            print(f"  MISMATCH: trainable parameters {tuner['trainable']:,} (tuner) vs {plain['trainable']:,} (plain)")
        if tuner["flags"] != plain["flags"]:
            print(f"  MISMATCH: backend flags {tuner['flags']} (tuner) vs {plain['flags']} (plain)")
    t, p = tuner or nan, plain or nan
    out = {f"{name}_it_s_ratio": t["it_s"] / p["it_s"], f"{name}_vram_ratio": t["peak_gib"] / p["peak_gib"]}
    if name == "flux_int8":
        out = {f"{name}_peak_gib": t["peak_gib"], **out}
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated, of: {', '.join(CASES)} (default all; --smoke sdxl_gc,flux_int8)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 20; --smoke 2)")
    parser.add_argument("--resolution", type=int, default=None, help="square image side (default 1024; --smoke 64)")
    parser.add_argument("--workdir", default=None, help="keep the written pipelines here (default: a temp dir)")
    parser.add_argument("--flux-blocks", default="19,38", help="double,single blocks of the Flux transformer")
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny pipelines at 64 px: checks the code path")
    for hidden in ("--worker", "--case", "--pipeline", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # sdxl is sdxl_gc's code path without checkpointing: --smoke leaves it out (two fewer processes)
    args.cases = args.cases or ("sdxl_gc,flux_int8" if args.smoke else ",".join(CASES))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 20)
    args.resolution = args.resolution or (64 if args.smoke else 1024)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; valid: {', '.join(CASES)}")
    from tuner.runtime.console import quiet_third_parties

    quiet_third_parties()
    if not args.smoke and not torch.cuda.is_available():
        print(
            "bench/gpu_throughput.py measures a CUDA GPU and none is available here; nothing was measured "
            f"(exit {NO_CUDA}). `--smoke` runs the same code path on CPU with the tiny pipelines.",
            file=sys.stderr,
        )
        return NO_CUDA
    import diffusers

    # (the device's name comes from the workers: asking here would hold a CUDA context through their runs)
    mode = "--smoke: CPU, the tiny pipelines" if args.smoke else "CUDA, real-shape random weights"
    print(f"{mode}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"{args.warmup} warm-up + {args.steps} measured steps per side, each side in a fresh process")
    figures: dict[str, float] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu_throughput.") as tmp:
        workdir = Path(args.workdir or tmp).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        blocks = tuple(int(n) for n in args.flux_blocks.split(","))
        pipelines = {}
        for name in names:
            case = CASES[name]
            if case.family not in pipelines:
                pipelines[case.family] = write_pipeline(case.family, workdir, args.smoke, blocks)
            blocks_note = f", {blocks[0]} + {blocks[1]} blocks" if case.family == "flux" and not args.smoke else ""
            print(f"{name}: {case.about}, {case.batch} x {args.resolution}²{blocks_note}", flush=True)
            tuner = run_side("tuner", name, pipelines[case.family], args, workdir)
            plain = run_side("plain", name, pipelines[case.family], args, workdir)
            figures.update(compare(name, tuner, plain))
            failed = failed or tuner is None or plain is None
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
