"""`python -m tuner.export single-file`: SD 1.x/2.x and SDXL pipelines as one checkpoint in the original
layout. diffusers' own single-file reader (the inverse of ours) must load it back to the very same
weights and images, offline, and the layout must hold at the real models' sizes too."""

import numpy as np
import pytest
import torch
from conftest import compose_cfg, generate, run_cli
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from omegaconf import open_dict
from safetensors.torch import load_file

from tuner.export import main
from tuner.interop.single_file import UnknownKeyError, unet_to_ldm
from tuner.run import train

FAMILIES = {"sd15": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine it makes them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _open_clip_g(file, config_dir, dtype):
    """SDXL's second encoder, read with diffusers' OpenCLIP reader, every weight required. (Its pipeline
    loader picks this encoder's weights by width; the tiny pipeline's two encoders are both 32 wide, so
    it would read CLIP-L's. The real ones, 768 and 1280 wide, are told apart.)"""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder_2"))
    state = convert_open_clip_checkpoint(model, load_file(file), prefix="conditioner.embedders.1.model.")
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def _from_single_file(cls, file, config_dir):
    """Offline: ``config=`` a diffusers folder gives every component's config, the tokenizers and the
    scheduler, so nothing is fetched (no ``original_config`` needed)."""
    extra = (
        {"text_encoder_2": _open_clip_g(file, config_dir, torch.float32)} if cls is StableDiffusionXLPipeline else {}
    )
    return cls.from_single_file(
        str(file), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32, **extra
    )


def _weights(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipe, name).state_dict() for name in COMPONENTS if hasattr(pipe, name)}


PREFIXES = {
    "sd15": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."),
    "sd2": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."),
    "sdxl": (
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.1.model.",
    ),
}
# Keys single-file loaders tell the model type by (A1111's for SD 2.x and SDXL, diffusers' for SD 1.x).
SIGNATURES = {
    "sd15": "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    "sd2": "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
    "sdxl": "conditioner.embedders.1.model.ln_final.weight",
}
OPEN_CLIP = {"sd2": "text_encoder", "sdxl": "text_encoder_2"}  # q, k, v weights and biases fused: 6 -> 2 a layer


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_loads_back_to_the_same_weights_and_image(family, demo_dir, tmp_path):
    cls, pipe_dir, file = FAMILIES[family], demo_dir / family, tmp_path / "model.safetensors"
    assert main(["single-file", str(pipe_dir), str(file)]) == 0
    ref = cls.from_pretrained(pipe_dir)
    state, weights = load_file(file), _weights(ref)
    # the tiny SD 2.x predicts velocity, as the 768-v models: marked so by an empty tensor, beside the weights
    marks = {k: state.pop(k).numel() for k in ("v_pred", "ztsnr") if k in state}
    assert marks == ({"v_pred": 0} if family == "sd2" else {})
    assert all(k.startswith(PREFIXES[family]) for k in state) and SIGNATURES[family] in state
    fused = 4 * getattr(ref, OPEN_CLIP[family]).config.num_hidden_layers if family in OPEN_CLIP else 0
    assert len(state) == sum(len(s) for s in weights.values()) - fused  # nothing dropped
    assert all(v.dtype == torch.float32 for v in state.values())

    loaded = _from_single_file(cls, file, pipe_dir)
    for name, original in weights.items():  # every tensor round-trips exactly
        back = getattr(loaded, name).state_dict()
        assert back.keys() == original.keys(), name
        assert all(torch.equal(back[k], original[k]) for k in original), name
    assert np.abs(generate(loaded) - generate(ref)).max() < 1e-4


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_half_writes_fp16_weights_that_round_the_same_model(family, demo_dir, tmp_path):
    cls, pipe_dir, file = FAMILIES[family], demo_dir / family, tmp_path / "model.safetensors"
    assert main(["single-file", str(pipe_dir), str(file), "--half"]) == 0
    assert all(v.dtype == torch.float16 for v in load_file(file).values())
    ref = cls.from_pretrained(pipe_dir)
    loaded = _from_single_file(cls, file, pipe_dir)  # upcast to fp32 on load
    for name, original in _weights(ref).items():
        back = getattr(loaded, name).state_dict()
        assert all(torch.equal(back[k], original[k].half().float()) for k in original), name
    assert np.abs(generate(loaded) - generate(ref)).max() < 1e-2  # 2e-3 seen


def test_a_full_fine_tune_run_exports_from_the_command_line(make_cfg, tmp_path):
    run, file = tmp_path / "run", tmp_path / "out" / "model.safetensors"
    quiet = ("callbacks.validation.enabled=false", "callbacks.ema.enabled=false")
    train(
        make_cfg("model=sd15", "model.finetune=full", "optimizer.lr=1e-3", "max_train_steps=2", *quiet, output_dir=run)
    )
    result = run_cli("-m", "tuner.export", "single-file", str(run), str(file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(str(file))
    trained = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    loaded = _from_single_file(StableDiffusionPipeline, file, run / "pipeline")
    assert np.abs(generate(loaded) - generate(trained)).max() < 1e-4


@pytest.fixture(scope="module")
def lora_run(demo_dir, tmp_path_factory):
    """A tiny SD 1.5 LoRA, trained hard enough in two steps to move the image."""
    out = tmp_path_factory.mktemp("lora_run")
    cfg = compose_cfg(
        [
            f"demo_assets_dir={demo_dir}",
            f"output_dir={out}",
            "model=sd15",
            "optimizer.lr=5e-2",
            "max_train_steps=2",
            "checkpointing_steps=2",
            "callbacks.validation.enabled=false",
            "callbacks.ema.enabled=false",
            "trainer.enable_progress_bar=false",
        ]
    )
    with open_dict(cfg):
        cfg.trainer.accelerator = "cpu"
    train(cfg)
    return out


def test_merge_lora_fuses_the_run_into_its_base_model(lora_run, demo_dir, tmp_path):
    file = tmp_path / "merged.safetensors"
    assert main(["single-file", str(lora_run), str(file), "--merge-lora"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(demo_dir / "sd15")
    base = generate(pipe)
    pipe.load_lora_weights(lora_run)
    with_lora = generate(pipe)
    merged = generate(_from_single_file(StableDiffusionPipeline, file, demo_dir / "sd15"))
    assert np.abs(merged - with_lora).max() < 1e-4  # fused vs. applied at run time: 2e-6 seen
    assert np.abs(merged - base).mean() > 1e-3  # the LoRA is in it


def test_refusals_are_one_line_and_write_nothing(lora_run, demo_dir, tmp_path, capsys):
    file = tmp_path / "model.safetensors"
    flux_lora = tmp_path / "flux_lora"  # a LoRA run's record: its family decides, before anything loads
    (flux_lora / ".hydra").mkdir(parents=True)
    (flux_lora / "pytorch_lora_weights.safetensors").touch()
    (flux_lora / ".hydra" / "config.yaml").write_text(
        f"model:\n  family: flux\n  pretrained_model_name_or_path: {demo_dir / 'flux'}\n"
    )
    result = run_cli("-m", "tuner.export", "single-file", str(demo_dir / "flux"), str(file))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "FluxPipeline" in line and "StableDiffusionPipeline" in line and "StableDiffusionXLPipeline" in line
    cases = {
        (str(lora_run), str(file)): "add --merge-lora",
        (str(demo_dir / "sd15"), str(file), "--merge-lora"): "LoRA run's output folder",
        (str(demo_dir / "sd15"), str(tmp_path / "model.ckpt")): "must end in .safetensors",
        (str(tmp_path / "missing"), str(file)): "no such folder",
        (str(demo_dir / "images"), str(file)): "holds no pipeline",
        (str(flux_lora), str(file), "--merge-lora"): "(model=flux) is a FluxPipeline",
    }
    for args, message in cases.items():
        assert main(["single-file", *args]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("tuner: error:") and message in line, line
    assert not file.exists() and [p.name for p in tmp_path.iterdir()] == ["flux_lora"]


def test_a_weight_with_no_original_name_fails_loudly():
    from diffusers import UNet2DConditionModel

    from models import tiny

    # class embeddings (the x4 upscaler's noise level): nowhere in the SD/SDXL original layout
    unet = UNet2DConditionModel(
        **tiny.UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        class_embed_type="timestep",
    )
    with pytest.raises(UnknownKeyError, match="class_embedding"):
        unet_to_ldm(unet)
    # a LoRA layer left in an attention block, where the inner names pass through unchanged
    unet = UNet2DConditionModel(**{**unet.config, "class_embed_type": None})
    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.register_parameter(
        "extra", torch.nn.Parameter(torch.zeros(1))
    )
    with pytest.raises(UnknownKeyError, match="attn1.extra"):
        unet_to_ldm(unet)


SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def _real_size_models():
    """The real models' architectures, on the meta device (shapes only, no memory, nothing downloaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def open_clip(width, layers, cls):
        config = CLIPTextConfig(
            hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 64, num_hidden_layers=layers
        )
        return cls(config)

    with torch.device("meta"):
        return {
            "sd15_unet": UNet2DConditionModel(**SD15_UNET),
            "sdxl_unet": UNet2DConditionModel(**SDXL_UNET),
            "vae": AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2,
            ),
            "clip_l": CLIPTextModel(CLIPTextConfig()),
            "open_clip_h": open_clip(1024, 23, CLIPTextModel),  # SD 2.x (its last layer is not used)
            "open_clip_big_g": open_clip(1280, 32, CLIPTextModelWithProjection),
        }


# The original checkpoints' own names for a few weights the block arithmetic must get right.
KNOWN = {
    "sd15_unet": ["input_blocks.9.0.op.weight", "output_blocks.2.1.conv.weight", "output_blocks.8.2.conv.weight"],
    "sdxl_unet": [
        "label_emb.0.2.weight",
        "output_blocks.2.2.conv.weight",
        "middle_block.1.transformer_blocks.9.ff.net.2.bias",
    ],
    "vae": [
        "decoder.up.3.block.2.conv2.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.down.1.block.0.nin_shortcut.bias",
    ],
    "clip_l": ["text_model.encoder.layers.11.mlp.fc2.weight"],
    "open_clip_h": ["transformer.resblocks.22.attn.in_proj_weight", "positional_embedding"],
    "open_clip_big_g": ["transformer.resblocks.31.mlp.c_proj.bias", "text_projection", "ln_final.weight"],
}


@pytest.mark.parametrize("name", KNOWN)
def test_the_layout_at_the_real_sizes_reads_back_with_diffusers(name):
    from diffusers.loaders import single_file_utils as reader

    from tuner.interop import single_file

    model = _real_size_models()[name]
    kind = name.split("_", 1)[-1] if name.endswith("unet") else name
    convert, read = {
        "unet": (single_file.unet_to_ldm, lambda s: reader.convert_ldm_unet_checkpoint(s, model.config)),
        "vae": (single_file.vae_to_ldm, lambda s: reader.convert_ldm_vae_checkpoint(s, model.config)),
        "clip_l": (single_file.clip_to_ldm, reader.convert_ldm_clip_checkpoint),
        "open_clip_h": (single_file.open_clip_to_ldm, lambda s: reader.convert_open_clip_checkpoint(model, s, prefix)),
        "open_clip_big_g": (
            single_file.open_clip_to_ldm,
            lambda s: reader.convert_open_clip_checkpoint(model, s, prefix),
        ),
    }[kind]
    prefix = {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "clip_l": "cond_stage_model.transformer.",
        "open_clip_h": "cond_stage_model.model.",
        "open_clip_big_g": "conditioner.embedders.1.model.",
    }[kind]
    ldm = convert(model)
    assert all(key in ldm for key in KNOWN[name])
    back = read({prefix + k: v for k, v in ldm.items()})
    original = single_file.clip_state(model) if "clip" in kind else model.state_dict()
    assert back.keys() == original.keys()
    assert all(back[k].shape == original[k].shape for k in original)
