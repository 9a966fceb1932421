"""Peak GPU memory of one SDXL-shape LoRA training step at 1024², per quantisation level (needs CUDA).

Random weights with SDXL base's UNet dimensions (bench/sdxl_shapes.py) in bf16, quantised at each
level, a rank-16 LoRA on the attention projections, gradient checkpointing on, batch 1 at 1024 px
(128x128 latents), AdamW. Reported: ``torch.cuda.max_memory_allocated`` for load + quantise + one step.
Last line: ``key=value`` figures in GiB.

    python bench/memory_gpu.py [--levels no_change,int8-quanto,int4-quanto,int2-quanto,fp8-quanto,nf4-bnb]
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


def one_step(level: str) -> float:
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from sdxl_shapes import sdxl_unet

    from models.quantize import quantize_module

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if level == "nf4-bnb":
        # bitsandbytes 4-bit is applied while loading in training; here: quantise the random bf16 model.
        import bitsandbytes as bnb

        unet = sdxl_unet(torch.bfloat16)
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
        unet = sdxl_unet(torch.bfloat16).cuda()
        quantize_module(unet, level)
    unet.add_adapter(
        LoraConfig(
            r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    cast_training_params(unet, dtype=torch.float32)
    unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latents = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(1, 77, 2048, device="cuda", dtype=torch.bfloat16)
    added = {
        "text_embeds": torch.randn(1, 1280, device="cuda", dtype=torch.bfloat16),
        "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]], device="cuda", dtype=torch.bfloat16),
    }
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pred = unet(
            latents, torch.tensor([500], device="cuda"), encoder_hidden_states=hidden, added_cond_kwargs=added
        ).sample
        loss = torch.nn.functional.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    del unet, optimizer, pred, loss, params
    gc.collect()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="no_change,int8-quanto,int4-quanto,int2-quanto,fp8-quanto,nf4-bnb")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/memory_gpu.py needs a CUDA GPU")
    print(torch.cuda.get_device_name(0))
    figures = {}
    for level in args.levels.split(","):
        try:
            figures[level] = one_step(level)
            print(f"{level:12s} peak {figures[level]:.2f} GiB")
        except Exception as err:  # noqa: BLE001 - report and go on to the next level
            print(f"{level:12s} failed: {type(err).__name__}: {err}")
    print(" ".join(f"{k.replace('-', '_')}_peak_gib={v:.2f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
