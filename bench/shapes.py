"""Each transformer family's denoiser at its real widths (the published transformer/config.json), for
random-weight benches that cannot hold the whole model (bench/memory.py's per-family rows).

A ``Shape`` builds the denoiser with few blocks of each kind; since every block of a kind has the same
bytes, builds with one more block of each kind give a per-block figure, from which the full model's bytes
follow exactly (``full_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flux_shapes import FLUX_TRANSFORMER

CHROMA_TRANSFORMER = dict(  # lodestones/Chroma1-HD: Flux's blocks, no modulation linears; the approximator instead
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    axes_dims_rope=(16, 56, 56),
    approximator_num_channels=64,
    approximator_hidden_dim=5120,
    approximator_layers=5,
)

QWEN_IMAGE_TRANSFORMER = dict(  # Qwen/Qwen-Image (and -2512): 60 double-stream blocks, MLPs 4x wide, no guidance embed
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,  # Qwen2.5-VL-7B's width
    axes_dims_rope=(16, 56, 56),
    guidance_embeds=False,
)

Z_IMAGE_TRANSFORMER = (
    dict(  # Tongyi-MAI/Z-Image-Turbo and Z-Image: 30 single-stream blocks + 2 noise and 2 text refiners
        all_patch_size=[2],
        all_f_patch_size=[1],
        in_channels=16,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-05,
        qk_norm=True,
        cap_feat_dim=2560,  # Qwen3-4B's width
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[32, 48, 48],
        axes_lens=[1536, 512, 512],
    )
)

HIDREAM_TRANSFORMER = dict(  # HiDream-ai/HiDream-I1-Full: 16 double + 32 single blocks, sparse-MoE feed-forwards
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=16,
    num_single_layers=32,
    attention_head_dim=128,
    num_attention_heads=20,
    caption_channels=[4096, 4096],  # T5-XXL, Llama 3.1 8B
    text_emb_dim=2048,  # CLIP-L 768 + CLIP-G 1280, pooled
    num_routed_experts=4,
    num_activated_experts=2,
    axes_dims_rope=(64, 32, 32),
    max_resolution=(128, 128),
    llama_layers=list(range(32)) + [31] * 16,  # which Llama layer feeds each of the 48 blocks
)


def _hidream_blocks(config: dict) -> dict:
    """A build with fewer blocks takes the first Llama layers its blocks need."""
    return {**config, "llama_layers": config["llama_layers"][: config["num_layers"] + config["num_single_layers"]]}


FLUX2_DEV_TRANSFORMER = dict(  # black-forest-labs/FLUX.2-dev: width 6144, text 3 x 5120 (Mistral Small 3's layers)
    patch_size=1,
    in_channels=128,
    num_layers=8,
    num_single_layers=48,
    attention_head_dim=128,
    num_attention_heads=48,
    joint_attention_dim=15360,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=True,
)
# FLUX.2 [klein] 4B and 9B: width 3072 / 4096, text 3 x Qwen3-4B's 2560 / Qwen3-8B's 4096, no guidance embedding
FLUX2_KLEIN_4B_TRANSFORMER = {**FLUX2_DEV_TRANSFORMER, "num_layers": 5, "num_single_layers": 20,
                              "num_attention_heads": 24, "joint_attention_dim": 7680, "guidance_embeds": False}  # fmt: skip
FLUX2_KLEIN_9B_TRANSFORMER = {**FLUX2_DEV_TRANSFORMER, "num_layers": 8, "num_single_layers": 24,
                              "num_attention_heads": 32, "joint_attention_dim": 12288, "guidance_embeds": False}  # fmt: skip

# Wan 2.1 T2V-14B (and each of Wan 2.2 A14B's two experts): 40 blocks at width 5120 (40 heads of 128), FFN 13824,
# UMT5-XXL's 4096 text width; 1.3B: 30 blocks at 1536 (12 heads), FFN 8960; Wan 2.2 TI2V-5B: 30 blocks at 3072
# (24 heads), FFN 14336, the 2.2 VAE's 48 latent channels
WAN21_14B_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
WAN21_1_3B_TRANSFORMER = {**WAN21_14B_TRANSFORMER, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
WAN22_5B_TRANSFORMER = {**WAN21_14B_TRANSFORMER, "num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30,
                        "in_channels": 48, "out_channels": 48}  # fmt: skip
# Lightricks/LTX-Video 0.9.x: 28 blocks at 2048 (32 heads of 64), T5-XXL's 4096 captions, 128 latent channels
LTX_VIDEO_TRANSFORMER = dict(
    in_channels=128,
    out_channels=128,
    patch_size=1,
    patch_size_t=1,
    num_attention_heads=32,
    attention_head_dim=64,
    cross_attention_dim=2048,
    num_layers=28,
    activation_fn="gelu-approximate",
    qk_norm="rms_norm_across_heads",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    caption_channels=4096,
    attention_bias=True,
    attention_out_bias=True,
)


@dataclass(frozen=True)
class Shape:
    model: str  # the diffusers class
    config: dict
    blocks: tuple[str, ...]  # the config keys that count blocks, one per kind
    # the config of a build with the given block counts, where other keys depend on them (HiDream's llama_layers)
    adjust: Callable[[dict], dict] = field(default=lambda config: config)

    def real_blocks(self) -> dict[str, int]:
        return {key: self.config[key] for key in self.blocks}

    def parameters_note(self) -> str:
        return ", ".join(f"{key}={n}" for key, n in self.real_blocks().items())

    def build(self, dtype, counts: dict[str, int]):
        """A random-weight denoiser built directly in ``dtype``, with ``counts`` blocks of each kind."""
        import diffusers
        import torch

        config = self.adjust({**self.config, **counts})
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return getattr(diffusers, self.model)(**config).eval().requires_grad_(False)
        finally:
            torch.set_default_dtype(previous)


def full_bytes(
    shape: Shape, measure: Callable[[dict[str, int]], dict[str, int]]
) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes (by whatever keys ``measure`` returns, e.g. precision) of the build with one block of each kind, and
    of the full model: ``measure(counts)`` of that build and of builds with one more block of one kind give
    each kind's bytes a block."""
    base_counts = dict.fromkeys(shape.blocks, 1)
    base = measure(base_counts)
    total = dict(base)
    for key, n in shape.real_blocks().items():
        more = measure({**base_counts, key: 2})
        for level in total:
            total[level] += (n - 1) * (more[level] - base[level])
    return base, total


SHAPES: dict[str, Shape] = {
    "flux": Shape("FluxTransformer2DModel", FLUX_TRANSFORMER, ("num_layers", "num_single_layers")),
    "chroma": Shape("ChromaTransformer2DModel", CHROMA_TRANSFORMER, ("num_layers", "num_single_layers")),
    "flux2_dev": Shape("Flux2Transformer2DModel", FLUX2_DEV_TRANSFORMER, ("num_layers", "num_single_layers")),
    "flux2_klein_4b": Shape("Flux2Transformer2DModel", FLUX2_KLEIN_4B_TRANSFORMER, ("num_layers", "num_single_layers")),
    "flux2_klein_9b": Shape("Flux2Transformer2DModel", FLUX2_KLEIN_9B_TRANSFORMER, ("num_layers", "num_single_layers")),
    "hidream": Shape(
        "HiDreamImageTransformer2DModel", HIDREAM_TRANSFORMER, ("num_layers", "num_single_layers"), _hidream_blocks
    ),
    "z_image": Shape("ZImageTransformer2DModel", Z_IMAGE_TRANSFORMER, ("n_layers", "n_refiner_layers")),
    "qwen_image": Shape("QwenImageTransformer2DModel", QWEN_IMAGE_TRANSFORMER, ("num_layers",)),
    "wan21_14b": Shape("WanTransformer3DModel", WAN21_14B_TRANSFORMER, ("num_layers",)),
    "wan21_1_3b": Shape("WanTransformer3DModel", WAN21_1_3B_TRANSFORMER, ("num_layers",)),
    "wan22_5b": Shape("WanTransformer3DModel", WAN22_5B_TRANSFORMER, ("num_layers",)),
    "ltx_video": Shape("LTXVideoTransformer3DModel", LTX_VIDEO_TRANSFORMER, ("num_layers",)),
}
