"""Peak GPU memory of one LoRA training step at 1024², per quantisation level (needs CUDA).

``--model sdxl``: random weights with SDXL base's UNet dimensions (bench/sdxl_shapes.py), 128x128 latents.
``--model flux``: the full FLUX.1 transformer (bench/flux_shapes.py, 19 + 38 blocks, 11.9 B parameters),
128x128 latents packed into 4096 tokens, 512 T5 tokens, guidance embedding on.
Both in bf16, quantised at each level, a rank-16 LoRA on the attention projections (the family's default
targets), gradient checkpointing on, batch 1, AdamW. Reported: ``torch.cuda.max_memory_allocated`` for
load + quantise + one step. Last line: ``key=value`` figures in GiB.

    python bench/memory_gpu.py [--model sdxl|flux] [--levels no_change,int8-quanto,int4-quanto,int2-quanto,fp8-quanto,nf4-bnb]

``--smoke`` runs the same step on the CPU with the tiny pipelines' denoisers (``python -m tuner.tiny``) at 64 px,
for both models: it checks the code path only, and its peaks are ``nan`` (there is no CUDA memory to read).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _build(model: str, smoke: bool):
    if smoke:
        from tuner.config.families import family_class

        cls = family_class(model)
        return getattr(cls.tiny_pipeline(model), cls.denoiser_name).to(torch.bfloat16)
    if model == "flux":
        from flux_shapes import flux_transformer

        return flux_transformer(torch.bfloat16)
    from sdxl_shapes import sdxl_unet

    return sdxl_unet(torch.bfloat16)


def _flux_loss(transformer, device: torch.device, side: int, text: int) -> torch.Tensor:
    """One Flux training forward on ``side``² latents packed 2x2 into tokens and ``text`` T5 tokens (1024 px:
    128, i.e. 4096 tokens, and 512); the widths from the transformer's config."""
    from models.flux import image_ids

    config = transformer.config
    kw = dict(device=device, dtype=torch.bfloat16)
    pred = transformer(
        hidden_states=torch.randn(1, (side // 2) ** 2, config.in_channels, **kw),
        timestep=torch.tensor([0.5], device=device),
        guidance=torch.tensor([1.0], device=device) if config.guidance_embeds else None,
        pooled_projections=torch.randn(1, config.pooled_projection_dim, **kw),
        encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim, **kw),
        txt_ids=torch.zeros(text, 3, **kw),
        img_ids=image_ids(side, side, device, torch.bfloat16),
        return_dict=False,
    )[0]
    return torch.nn.functional.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))


def _sdxl_loss(unet, device: torch.device) -> torch.Tensor:
    """One SDXL training forward at the UNet's own sample size (SDXL: 128² latents, 1024 px)."""
    config = unet.config
    side, pixels = config.sample_size, config.sample_size * 8
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim  # 6 size/crop ids
    kw = dict(device=device, dtype=torch.bfloat16)
    added = {
        "text_embeds": torch.randn(1, pooled, **kw),
        "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], **kw),
    }
    pred = unet(
        torch.randn(1, config.in_channels, side, side, **kw),
        torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, 77, config.cross_attention_dim, **kw),
        added_cond_kwargs=added,
    ).sample
    return torch.nn.functional.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))


def one_step(level: str, model: str = "sdxl", smoke: bool = False) -> float:
    """Peak GiB of load + quantise + one step (``nan`` on the CPU, under ``smoke``)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from models.quantize import quantize_module

    device = torch.device("cpu" if smoke else "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if level == "nf4-bnb":
        # bitsandbytes 4-bit is applied while loading in training; here: quantise the random bf16 model.
        import bitsandbytes as bnb

        unet = _build(model, smoke)
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
        unet = unet.to(device)
    else:
        unet = _build(model, smoke).to(device)
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
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if model == "flux":
            loss = _flux_loss(unet, device, *((8, 8) if smoke else (128, 512)))
        else:
            loss = _sdxl_loss(unet, device)
    loss.backward()
    optimizer.step()
    peak = math.nan
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    del unet, optimizer, loss, params
    gc.collect()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["sdxl", "flux"], default="sdxl")
    parser.add_argument("--levels", default="no_change,int8-quanto,int4-quanto,int2-quanto,fp8-quanto,nf4-bnb")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny denoisers, both models: the code path")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench/memory_gpu.py needs a CUDA GPU (or --smoke, which runs the code path on the CPU)")
    print("CPU, the tiny denoisers (--smoke)" if args.smoke else torch.cuda.get_device_name(0))
    figures, failed = {}, []
    for model in ("sdxl", "flux") if args.smoke else (args.model,):
        prefix = "flux_" if model == "flux" else ""
        for level in args.levels.split(","):
            try:
                figures[f"{prefix}{level.replace('-', '_')}"] = peak = one_step(level, model, args.smoke)
                print(f"{model} {level:12s} peak {peak:.2f} GiB")
            except Exception as err:  # noqa: BLE001 - report and go on to the next level
                print(f"{model} {level:12s} failed: {type(err).__name__}: {err}")
                failed.append(f"{model} {level}")
    print(" ".join(f"{k}_peak_gib={v:.2f}" for k, v in figures.items()))
    # On a GPU a failed level is a failed bench; --smoke's CPU kernels have a known gap (bench/README.md)
    if failed and not args.smoke:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
