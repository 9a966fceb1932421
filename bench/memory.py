"""Memory of quantised weights and optimiser state. Last line: ``key=value`` figures.

1. A random-weight denoiser with SDXL's real UNet dimensions, in bf16, then quantised at each
   optimum-quanto level: weight bytes (what the tensors hold, quantised data and scales included) and
   the process's peak RSS after building it. ``int8_weight_ratio`` = int8 / bf16 weight bytes.
2. One LoRA training step on the tiny SD model per optimiser: the optimiser-state bytes.
   ``adamw8bit_state_ratio`` = AdamW8bit / AdamW. bitsandbytes keeps tensors under 4096 elements in
   32 bits, so the LoRA rank here (128) makes every LoRA matrix large enough to be stored in 8 bits,
   as SDXL's are at rank 16.

3. One row per transformer family (bench/shapes.py: the denoiser at its real widths, one and two blocks of each
   kind, so the full model's bytes follow exactly without holding it): bf16 and int8 weight bytes of the whole
   model, ``<family>_bf16_gib``, ``<family>_int8_gib`` and ``<family>_int8_weight_ratio``.

    python bench/memory.py [--levels int8-quanto,int4-quanto,...] [--skip-sdxl] [--families flux,chroma,...]

``--smoke`` measures the tiny pipelines' denoisers (``python -m tuner.tiny``) instead of the real shapes, and
AdamW against AdamW8bit only: the code path in seconds, not figures to quote.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: quanto's quantised tensors keep their data (bit-packed below 8 bits),
    scales and shifts in inner tensors, so those are counted instead of the logical shape."""
    inner = [getattr(t, name) for name in ("_data", "_scale", "_shift") if torch.is_tensor(getattr(t, name, None))]
    if inner:
        return sum(_nbytes(x) for x in inner)
    return t.numel() * t.element_size()


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers."""
    return sum(_nbytes(t) for t in [*module.parameters(), *module.buffers()])


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def bench_weights(levels: list[str], build, label: str) -> dict[str, int]:
    """Weight bytes of ``build(torch.bfloat16)`` in bf16 and at each quantisation level."""
    from models.quantize import quantize_module

    sizes = {}
    model = build(torch.bfloat16)
    sizes["bf16"] = tensor_bytes(model)
    print(
        f"{label}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
        f"bf16 {sizes['bf16'] / 2**30:.2f} GiB, peak RSS {peak_rss_gib():.1f} GiB"
    )
    del model
    gc.collect()
    for level in levels:
        model = quantize_module(build(torch.bfloat16), level)
        sizes[level] = tensor_bytes(model)
        print(f"  {level:12s} weights {sizes[level] / 2**30:.2f} GiB ({sizes[level] / sizes['bf16']:.3f} of bf16)")
        del model
        gc.collect()
    return sizes


def _bf16_and_int8(shape, counts: dict[str, int]) -> dict[str, int]:
    """Weight bytes of one real-width build in bf16, then quantised in place to int8."""
    from models.quantize import quantize_module

    model = shape.build(torch.bfloat16, counts)
    out = {"bf16": tensor_bytes(model)}
    out["int8"] = tensor_bytes(quantize_module(model, "int8-quanto"))
    del model
    gc.collect()
    return out


def family_rows(families: list[str]) -> dict[str, float]:
    """bf16 and int8 weight bytes of each family's full denoiser, from real-width builds of few blocks."""
    from shapes import SHAPES, full_bytes

    figures = {}
    for family in families:
        shape = SHAPES[family]
        built, full = full_bytes(shape, partial(_bf16_and_int8, shape))
        bf16, int8, built_bf16 = full["bf16"], full["int8"], built["bf16"]
        print(
            f"{family}: {shape.model} at real widths ({shape.parameters_note()}, ~{bf16 / 2e9:.1f} B parameters): "
            f"bf16 {bf16 / 2**30:.2f} GiB, "
            f"int8 {int8 / 2**30:.2f} GiB ({int8 / bf16:.3f}); built with one and two blocks a kind "
            f"({built_bf16 / 2**30:.2f} GiB the smallest), peak RSS {peak_rss_gib():.1f} GiB"
        )
        figures.update(
            {
                f"{family}_bf16_gib": bf16 / 2**30,
                f"{family}_int8_gib": int8 / 2**30,
                f"{family}_int8_weight_ratio": int8 / bf16,
            }
        )
    return figures


def tiny_denoiser(family: str):
    """A builder of the family's tiny denoiser, in the dtype asked (``--smoke``)."""

    def build(dtype):
        from tuner.config.families import family_class

        cls = family_class(family)
        return getattr(cls.tiny_pipeline(family), cls.denoiser_name).to(dtype)

    return build


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def bench_optimizers(names: list[str]) -> dict[str, int]:
    import logging

    from common import compose_config
    from hydra.utils import instantiate

    from datamodules.demo import write_images
    from tuner.config.families import write_tiny
    from tuner.run import prepare
    from tuner.runtime.model import optimizer_factory

    logging.disable(logging.WARNING)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny("sd15", Path(tmp) / "sd15")
        write_images(Path(tmp) / "images")
        for name in names:
            cfg = compose_config(
                [
                    f"demo_assets_dir={tmp}",
                    f"output_dir={tmp}/out",
                    "max_train_steps=1",
                    f"optimizer={name}",
                    "model.lora.rank=128",
                ]
            )
            cfg = prepare(cfg)
            module = instantiate(cfg.model, optimizer=None, lr_scheduler=None)
            params = [p for p in module.parameters() if p.requires_grad]
            optimizer = optimizer_factory(cfg)(params)
            dm = instantiate(cfg.data, seed=0)
            dm.scan()
            batch = next(iter(dm.train_dataloader()))
            module.compute_loss(batch, torch.Generator().manual_seed(0)).backward()
            optimizer.step()
            out[name] = state_bytes(optimizer)
            print(
                f"  {name:12s} optimiser state {out[name] / 2**20:.2f} MiB for {sum(p.numel() for p in params):,} LoRA parameters"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="int8-quanto,int4-quanto,int2-quanto,fp8-quanto")
    parser.add_argument("--optimizers", default="adamw,adamw8bit,lion,lion8bit,stableadamw,prodigy,adafactor")
    parser.add_argument("--skip-sdxl", action="store_true", help="skip the 2.6 B-parameter weight figures")
    parser.add_argument(
        "--families",
        default=None,
        help="transformer families' rows (default: every one of bench/shapes.py; '' for none)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny denoisers, AdamW and AdamW8bit: the code path")
    args = parser.parse_args()
    if args.smoke:
        args.optimizers = "adamw,adamw8bit"
    figures = {}
    if not args.skip_sdxl:
        from sdxl_shapes import sdxl_unet

        build, label = (tiny_denoiser("sdxl"), "tiny SDXL UNet") if args.smoke else (sdxl_unet, "SDXL-shape UNet")
        sizes = bench_weights(args.levels.split(","), build, label)
        figures.update({f"{k.split('-')[0]}_weight_ratio": v / sizes["bf16"] for k, v in sizes.items() if k != "bf16"})
        figures["bf16_weight_gib"] = sizes["bf16"] / 2**30
    if args.smoke:
        sizes = bench_weights(["int8-quanto"], tiny_denoiser("flux"), "tiny Flux transformer")
        figures["flux_int8_weight_ratio"] = sizes["int8-quanto"] / sizes["bf16"]
    else:
        from shapes import SHAPES

        names = list(SHAPES) if args.families is None else [f for f in args.families.split(",") if f]
        figures.update(family_rows(names))
    figures["peak_rss_gib"] = peak_rss_gib()
    states = bench_optimizers(args.optimizers.split(","))
    figures.update({f"{k}_state_ratio": v / states["adamw"] for k, v in states.items() if k != "adamw"})
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
