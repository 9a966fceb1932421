"""Peak GPU memory of one LoRA training step at 1024², per quantisation level (needs CUDA).

``--model sdxl``: random weights with SDXL base's UNet dimensions (bench/sdxl_shapes.py), 128x128 latents.
``--model flux``: the full FLUX.1 transformer (bench/flux_shapes.py, 19 + 38 blocks, 11.9 B parameters),
128x128 latents packed into 4096 tokens, 512 T5 tokens, guidance embedding on.
Both in bf16, quantised at each level, a rank-16 LoRA on the attention projections (the family's default
targets), gradient checkpointing on, batch 1, AdamW. Reported: ``torch.cuda.max_memory_allocated`` for
load + quantise + one step. Last line: ``key=value`` figures in GiB.

    python bench/memory_gpu.py [--model sdxl|flux] [--levels no_change,int8-quanto,int4-quanto,int2-quanto,fp8-quanto,nf4-bnb]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _build(model: str):
    if model == "flux":
        from flux_shapes import flux_transformer

        return flux_transformer(torch.bfloat16)
    from sdxl_shapes import sdxl_unet

    return sdxl_unet(torch.bfloat16)


def _flux_loss(transformer) -> torch.Tensor:
    """One Flux training forward at 1024 px: 4096 packed latent tokens, 512 T5 tokens."""
    from models.flux import image_ids

    kw = dict(device="cuda", dtype=torch.bfloat16)
    pred = transformer(
        hidden_states=torch.randn(1, 4096, 64, **kw),
        timestep=torch.tensor([0.5], device="cuda"),
        guidance=torch.tensor([1.0], device="cuda"),
        pooled_projections=torch.randn(1, 768, **kw),
        encoder_hidden_states=torch.randn(1, 512, 4096, **kw),
        txt_ids=torch.zeros(512, 3, **kw),
        img_ids=image_ids(128, 128, "cuda", torch.bfloat16),
        return_dict=False,
    )[0]
    return torch.nn.functional.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))


def _sdxl_loss(unet) -> torch.Tensor:
    kw = dict(device="cuda", dtype=torch.bfloat16)
    added = {
        "text_embeds": torch.randn(1, 1280, **kw),
        "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]], **kw),
    }
    pred = unet(
        torch.randn(1, 4, 128, 128, **kw),
        torch.tensor([500], device="cuda"),
        encoder_hidden_states=torch.randn(1, 77, 2048, **kw),
        added_cond_kwargs=added,
    ).sample
    return torch.nn.functional.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))


def one_step(level: str, model: str = "sdxl") -> float:
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from models.quantize import quantize_module

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if level == "nf4-bnb":
        # bitsandbytes 4-bit is applied while loading in training; here: quantise the random bf16 model.
        import bitsandbytes as bnb

        unet = _build(model)
        for child in list(unet.modules()):
            for attr, sub in list(child.named_children()):
                if isinstance(sub, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(
                        sub.in_features,
                        sub.out_features,
                        bias=sub.bias is not None,
                        compute_dtype=torch.bfloat16,
                        quant_type="nf4",
                    )
                    q.weight = bnb.nn.Params4bit(sub.weight.data, requires_grad=False, quant_type="nf4")
                    if sub.bias is not None:
                        q.bias = sub.bias
                    setattr(child, attr, q)
        unet = unet.cuda()
    else:
        unet = _build(model).cuda()
        quantize_module(unet, level)
    if model == "flux":
        from models.flux import FluxModule

        targets = list(FluxModule.default_lora_targets)
    else:
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=targets))
    cast_training_params(unet, dtype=torch.float32)
    unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = _flux_loss(unet) if model == "flux" else _sdxl_loss(unet)
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    del unet, optimizer, loss, params
    gc.collect()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["sdxl", "flux"], default="sdxl")
    parser.add_argument("--levels", default="no_change,int8-quanto,int4-quanto,int2-quanto,fp8-quanto,nf4-bnb")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/memory_gpu.py needs a CUDA GPU")
    print(torch.cuda.get_device_name(0))
    figures = {}
    for level in args.levels.split(","):
        try:
            figures[level] = one_step(level, args.model)
            print(f"{level:12s} peak {figures[level]:.2f} GiB")
        except Exception as err:  # noqa: BLE001 - report and go on to the next level
            print(f"{level:12s} failed: {type(err).__name__}: {err}")
    prefix = "flux_" if args.model == "flux" else ""
    print(" ".join(f"{prefix}{k.replace('-', '_')}_peak_gib={v:.2f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
