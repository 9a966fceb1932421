"""SDXL base 1.0's UNet dimensions (from its published unet/config.json), for random-weight benchmarks."""

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def sdxl_unet(dtype):
    """A random-weight UNet with SDXL's shapes, built directly in ``dtype`` (2.6 B parameters)."""
    import torch
    from diffusers import UNet2DConditionModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return UNet2DConditionModel(**SDXL_UNET).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
