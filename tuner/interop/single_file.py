"""An SD 1.x/2.x or SDXL pipeline as one checkpoint in the original (LDM / "CompVis") layout: the single
``.safetensors`` file that AUTOMATIC1111, Forge, ComfyUI and CivitAI load.

diffusers reads this layout (``diffusers.loaders.single_file_utils``) but does not write it. The renames
here go the other way, as tables built from each model's config. A key that no table covers is an
error, never dropped: a model these tables do not describe fails here, not half-loaded in another tool.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Table = dict[str, str]  # diffusers module path -> original module path


class ExportError(ValueError):
    """A one-line, user-facing reason the export cannot go ahead."""


class UnknownKeyError(ExportError):
    """A weight that has no name in the original layout."""


def rename(state: dict[str, torch.Tensor], table: Table, what: str) -> dict[str, torch.Tensor]:
    """Each key with its longest dotted prefix found in ``table`` replaced; a key with none raises."""
    out, unknown = {}, []
    for key, tensor in state.items():
        parts = key.split(".")
        cut = next((n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in table), None)
        if cut is None:
            unknown.append(key)
            continue
        out[".".join([table[".".join(parts[:cut])], *parts[cut:]])] = tensor
    if unknown:
        raise UnknownKeyError(
            f"{what}: {len(unknown)} weight(s) with no name in the original single-file layout "
            f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); nothing was written"
        )
    if len(out) != len(state):
        raise ExportError(f"{what}: two weights were given the same original name; nothing was written")
    return out


def children(src: str, dst: str, names: dict[str, str]) -> Table:
    """Table entries for the submodules ``names`` of module ``src``, which is ``dst`` in the original."""
    return {f"{src}.{a}": f"{dst}.{b}" for a, b in names.items()}


# --- UNet -------------------------------------------------------------------------------------------

UNET_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text + size conditioning
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_table(config: dict[str, Any]) -> Table:
    """The original UNet numbers its blocks flat: ``input_blocks.N`` holds (resnet, attention) per layer,
    then a downsampler per level; ``output_blocks.N`` holds (resnet, attention, upsampler). Attention
    blocks keep their inner names (``transformer_blocks.*``, ``proj_in``, ...) in both layouts."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ExportError(f"UNet: layers_per_block={layers!r} per level has no original single-file layout")
    table = dict(UNET_FIXED)
    down, up = config["down_block_types"], config["up_block_types"]
    for i in range(len(down)):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            table.update(children(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", UNET_RESNET))
            table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
        if i < len(down) - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op"
    table.update(children("mid_block.resnets.0", "middle_block.0", UNET_RESNET))
    table["mid_block.attentions.0"] = "middle_block.1"
    table.update(children("mid_block.resnets.1", "middle_block.2", UNET_RESNET))
    for i, kind in enumerate(up):
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            table.update(children(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", UNET_RESNET))
            table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
        if i < len(up) - 1:  # after the attention, where the level has one
            slot = 2 if kind.startswith("CrossAttn") else 1
            table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (layers + 1) + layers}.{slot}.conv"
    return table


# Inside an attention block both layouts use the same names; these are all the weights one holds.
ATTENTION = re.compile(r"(?:down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)attentions\.\d+\.(.+)")
ATTENTION_PARTS = re.compile(
    r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(norm[123]|attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2)))"
    r"\.(weight|bias)"
)


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    state = unet.state_dict()
    odd = [k for k in state if (m := ATTENTION.fullmatch(k)) and not ATTENTION_PARTS.fullmatch(m.group(1))]
    if odd:  # e.g. a LoRA layer left in place: it would pass through the prefix renames unnoticed
        raise UnknownKeyError(
            f"UNet: attention weight(s) with no original name ({', '.join(odd[:3])}); nothing was written"
        )
    return rename(state, unet_table(unet.config), "UNet")


# --- VAE --------------------------------------------------------------------------------------------

VAE_FIXED = {
    **{name: name for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out")},
    **{name: name for name in ("quant_conv", "post_quant_conv")},
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_table(config: dict[str, Any]) -> Table:
    """Encoder levels keep their order; the original decoder numbers its levels from the bottom up."""
    layers, levels = config["layers_per_block"], len(config["down_block_types"])
    table = dict(VAE_FIXED)
    for i in range(levels):
        for j in range(layers):
            table.update(children(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET))
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    for i in range(len(config["up_block_types"])):
        up = len(config["up_block_types"]) - 1 - i
        for j in range(layers + 1):
            table.update(children(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", VAE_RESNET))
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    for side in ("encoder", "decoder"):
        for k in (0, 1):
            table.update(children(f"{side}.mid_block.resnets.{k}", f"{side}.mid.block_{k + 1}", VAE_RESNET))
        table.update(children(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", VAE_ATTENTION))
    return table


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    state = rename(vae.state_dict(), vae_table(vae.config), "VAE")
    # The original mid-block attention projects with 1x1 convolutions, diffusers with linear layers.
    return {k: v[:, :, None, None] if ".mid.attn_1." in k and v.ndim == 2 else v for k, v in state.items()}


# --- Text encoders ----------------------------------------------------------------------------------


def clip_state(encoder) -> dict[str, torch.Tensor]:
    """The encoder's weights under the ``text_model.`` names of CLIP checkpoints (transformers 5.6 and
    later leave that level out of ``CLIPTextModel``, not of ``CLIPTextModelWithProjection``)."""
    state = encoder.state_dict()
    keep = ("text_model.", "text_projection.")
    return {k if k.startswith(keep) else f"text_model.{k}": v for k, v in state.items()}


CLIP_LAYER = (
    "layer_norm1",
    "layer_norm2",
    "mlp.fc1",
    "mlp.fc2",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
)
# position_ids: a buffer older transformers saved; the original SD 1.x checkpoints have it at this name
CLIP_FIXED = (
    "embeddings.token_embedding",
    "embeddings.position_embedding",
    "embeddings.position_ids",
    "final_layer_norm",
)


def clip_to_ldm(encoder) -> dict[str, torch.Tensor]:
    """OpenAI CLIP-L (SD 1.x, SDXL's first encoder) keeps the transformers names in the original layout."""
    table = {f"text_model.{name}": f"text_model.{name}" for name in CLIP_FIXED}
    for n in range(encoder.config.num_hidden_layers):
        layer = f"text_model.encoder.layers.{n}"
        table.update(children(layer, layer, {name: name for name in CLIP_LAYER}))
    return rename(clip_state(encoder), table, "CLIP text encoder")


OPEN_CLIP_FIXED = {
    "text_model.embeddings.token_embedding": "token_embedding",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm": "ln_final",
    "text_projection.weight": "text_projection",
}
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pops each layer's q, k and v projections out of ``state`` and returns them as OpenCLIP's one
    ``in_proj`` (torch's MultiheadAttention: q, k, v stacked along the output axis)."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key in [k for k in state if QKV.fullmatch(k)]:
        layer, which, kind = QKV.fullmatch(key).groups()
        parts.setdefault((layer, kind), {})[which] = state.pop(key)
    fused = {}
    for (layer, kind), qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise ExportError(f"OpenCLIP text encoder: layer {layer} lacks some of its q/k/v {kind}")
        fused[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return fused


def open_clip_to_ldm(encoder) -> dict[str, torch.Tensor]:
    """OpenCLIP (SD 2.x's ViT-H, SDXL's bigG): its own names, fused q/k/v and a projection matrix."""
    state = clip_state(encoder)
    state.pop("text_model.embeddings.position_ids", None)  # a buffer transformers derives, not a weight
    fused = fuse_qkv(state)
    table = dict(OPEN_CLIP_FIXED)
    for n in range(encoder.config.num_hidden_layers):
        table.update(children(f"text_model.encoder.layers.{n}", f"transformer.resblocks.{n}", OPEN_CLIP_LAYER))
    out = rename(state, table, "OpenCLIP text encoder")
    if "text_projection" in out:  # a Linear's weight (out, in); OpenCLIP multiplies x @ P with P (in, out)
        out["text_projection"] = out["text_projection"].T
    return {**out, **fused}


# --- Pipelines --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    component: str  # the pipeline's attribute
    prefix: str  # where the original checkpoint keeps it
    convert: Callable[[Any], dict[str, torch.Tensor]]


UNET = Part("unet", "model.diffusion_model.", unet_to_ldm)
VAE = Part("vae", "first_stage_model.", vae_to_ldm)
LAYOUTS = {
    "SD 1.x": (UNET, VAE, Part("text_encoder", "cond_stage_model.transformer.", clip_to_ldm)),
    "SD 2.x": (UNET, VAE, Part("text_encoder", "cond_stage_model.model.", open_clip_to_ldm)),
    "SDXL": (
        UNET,
        VAE,
        Part("text_encoder", "conditioner.embedders.0.transformer.", clip_to_ldm),
        Part("text_encoder_2", "conditioner.embedders.1.model.", open_clip_to_ldm),
    ),
}
SUPPORTED = {"StableDiffusionPipeline": "SD 1.x/2.x", "StableDiffusionXLPipeline": "SDXL"}


def check_supported(class_name: str, where: str) -> None:
    if class_name not in SUPPORTED:
        names = ", ".join(f"{family} ({cls})" for cls, family in SUPPORTED.items())
        raise ExportError(f"{where} is a {class_name}; single-file export supports {names} only")


def layout_of(pipe) -> str:
    check_supported(type(pipe).__name__, "the pipeline")
    if type(pipe).__name__ == "StableDiffusionXLPipeline":
        return "SDXL"
    # SD 2.x's UNet projects into its transformers with linear layers, SD 1.x's with 1x1 convolutions (the
    # original v2 configs' use_linear_in_transformer); the same split decides their text encoder's layout.
    return "SD 2.x" if pipe.unet.config.use_linear_projection else "SD 1.x"


def schedule_marks(scheduler_config: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The empty tensors by which single-file loaders tell how the model samples, from the scheduler it was
    trained for: ``v_pred`` (it predicts velocity) and ``ztsnr`` (its schedule is rescaled to zero terminal
    SNR, Lin et al. 2023). Their names are the convention ComfyUI's and Forge's model detection read; the
    weights alone do not say it, and an epsilon sampler on a v-prediction model gives noise."""
    marks = {}
    if scheduler_config.get("prediction_type") == "v_prediction":
        marks["v_pred"] = torch.tensor([], dtype=dtype or torch.float32)
    if scheduler_config.get("rescale_betas_zero_snr"):
        marks["ztsnr"] = torch.tensor([], dtype=dtype or torch.float32)
    return marks


def to_ldm(pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every weight of the pipeline's UNet, VAE and text encoder(s) under its original name, and the marks
    of how its scheduler samples (``schedule_marks``)."""
    state = {}
    for part in LAYOUTS[layout_of(pipe)]:
        for key, tensor in part.convert(getattr(pipe, part.component)).items():
            tensor = tensor.detach() if dtype is None else tensor.detach().to(dtype)
            state[part.prefix + key] = tensor.contiguous()
    return {**state, **schedule_marks(pipe.scheduler.config, dtype)}
