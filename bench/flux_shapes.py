"""FLUX.1's transformer dimensions (from its published transformer/config.json), for random-weight benchmarks.

The real model has 19 double-stream and 38 single-stream blocks (11.9 B parameters, about 24 GB in bf16).
Weight ratios between quantisation levels do not depend on the block count, so the CPU bench builds
fewer blocks with the real widths (3072 hidden, 24 heads of 128) to fit a small machine's RAM.
"""

FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def flux_transformer(dtype, num_layers: int | None = None, num_single_layers: int | None = None):
    """A random-weight Flux transformer built directly in ``dtype``; fewer blocks when asked."""
    import torch
    from diffusers import FluxTransformer2DModel

    config = dict(FLUX_TRANSFORMER)
    if num_layers is not None:
        config.update(num_layers=num_layers, num_single_layers=num_single_layers)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return FluxTransformer2DModel(**config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
