"""Per-GPU peak memory and step time of a Flux full fine-tune, sharded as ``trainer=fsdp`` shards it, beside
DDP's full replica on each GPU. Needs 2+ CUDA GPUs:

    torchrun --nproc-per-node=2 bench/fsdp_gpu.py [--layers 4 --single-layers 8] [--steps 4]

Random weights at FLUX.1's widths (bench/flux_shapes.py); fewer blocks than the real 19 + 38 by default, so
that DDP's replica (fp32 weights, gradients and AdamW state: 16 bytes a parameter) fits a GPU too. Both
sides: bf16 autocast, the transformer's own gradient checkpointing, AdamW, one 1024 px image (4096 tokens)
per GPU with 512 T5 tokens. The sharded side goes through tuner.runtime.scale.shard_denoiser with FluxModule's
``fsdp_blocks``, gathering in bf16 and reducing in fp32, as DenoiserFSDP does under mixed_precision=bf16.
Reported: the largest ``torch.cuda.max_memory_allocated`` over the ranks, and the median step time after
the first. Last line (rank 0): ``ddp_peak_gib=… fsdp_peak_gib=… peak_ratio=… ddp_step_ms=… fsdp_step_ms=…
step_ratio=…``. ``--tiny --cpu`` runs the same code on the tiny Flux over gloo (a smoke test of the script);
``--smoke`` is that with 2 steps, and started without torchrun it runs as a group of one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def build(args) -> torch.nn.Module:
    """The transformer in fp32 (a full fine-tune's master weights), the same on every rank."""
    torch.manual_seed(0)
    if args.tiny:
        from models.flux import FluxModule

        model = FluxModule.tiny_pipeline("flux").transformer.float()
    else:
        from flux_shapes import flux_transformer

        model = flux_transformer(torch.float32, args.layers, args.single_layers)
    model.requires_grad_(True).train()
    model.enable_gradient_checkpointing()
    return model


def batch(model: torch.nn.Module, device: torch.device, tokens: int, text: int) -> dict:
    """One training input at the model's widths: ``tokens`` packed latent tokens, ``text`` T5 tokens."""
    from models.flux import image_ids

    config = model.config
    side = int(tokens**0.5) * 2  # packed 2x2: (side/2)^2 tokens
    return dict(
        hidden_states=torch.randn(1, tokens, config.in_channels, device=device),
        timestep=torch.tensor([0.5], device=device),
        guidance=torch.tensor([1.0], device=device) if config.guidance_embeds else None,
        pooled_projections=torch.randn(1, config.pooled_projection_dim, device=device),
        encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim, device=device),
        txt_ids=torch.zeros(text, 3, device=device),
        img_ids=image_ids(side, side, device, torch.float32),
        return_dict=False,
    )


def run(model: torch.nn.Module, inputs: dict, steps: int, device: torch.device) -> tuple[float, float]:
    """(peak GiB, the largest over the ranks; median step ms) of ``steps`` AdamW steps."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = model(**inputs)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), torch.zeros_like(pred, dtype=torch.float32))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    del optimizer
    return float(peak), statistics.median(times[1:] or times)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4, help="double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--single-layers", type=int, default=8, help="single-stream blocks (FLUX.1: 38)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="the tiny random Flux instead of FLUX.1's widths")
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU (a smoke test; no memory figures)")
    parser.add_argument("--smoke", action="store_true", help="--tiny --cpu, 2 steps; one process without torchrun")
    args = parser.parse_args()
    if args.smoke:
        args.tiny, args.cpu, args.steps = True, True, 2
        if "RANK" not in os.environ:  # not under torchrun: a process group of one
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("bench/fsdp_gpu.py needs CUDA GPUs (or --tiny --cpu for a smoke test)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.nn.parallel import DistributedDataParallel

    from models.flux import FluxModule
    from tuner.runtime.scale import block_classes, shard_denoiser

    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if args.cpu else torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if args.cpu else "nccl")
    tokens, text = (16, 8) if args.tiny else (4096, 512)

    model = build(args)
    inputs = batch(model, device, tokens, text)
    ddp = DistributedDataParallel(model.to(device), device_ids=None if args.cpu else [local])
    ddp_peak, ddp_ms = run(ddp, inputs, args.steps, device)
    del ddp, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    model = build(args)  # on the CPU: fully_shard moves each block's shard to the GPU
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    shard_denoiser(model, block_classes(FluxModule.fsdp_blocks, model), mesh, policy, reshard_after_forward=True)
    fsdp_peak, fsdp_ms = run(model, inputs, args.steps, device)

    if dist.get_rank() == 0:
        params = sum(p.numel() for p in model.parameters()) / 1e9
        print(
            f"{dist.get_world_size()} ranks, {params:.2f} B parameters, {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}"
        )
        ratio = fsdp_peak / ddp_peak if ddp_peak else float("nan")
        print(
            f"ddp_peak_gib={ddp_peak:.2f} fsdp_peak_gib={fsdp_peak:.2f} peak_ratio={ratio:.3f} "
            f"ddp_step_ms={ddp_ms:.1f} fsdp_step_ms={fsdp_ms:.1f} step_ratio={fsdp_ms / ddp_ms:.3f}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
