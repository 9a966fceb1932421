"""FLUX.1's control LoRA (``model=flux model.control=lora``, models/flux_control.py): the transformer's inputs in one
training step against FluxControlPipeline's denoising call (packed noisy latents and the control's packed posterior
sample concatenated on channels, ids, timestep, guidance); the widened x_embedder (new columns zero, the old the
base's, so step 0 is the base model); a CLI run whose LoRA loads into FluxControlPipeline built from the BASE tiny
FLUX.1 [dev]; bit-exact resume; validation's input as the control image; the config checks."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from safetensors.torch import load_file

from models.flux import pack
from models.flux_control import FluxControlModule, widen_x_embedder
from models.flux_kontext import input_image
from tuner.config import ConfigError
from tuner.run import build_module, prepare, train

CAPTION = "a red circle on white"
CONTROL = ("model=flux", "model.control=lora")


def _module(make_cfg, out, *overrides):
    return build_module(prepare(make_cfg(*CONTROL, *overrides, output_dir=out)), with_optimizer=False)


def _hooked(module) -> list[dict]:
    seen = []
    module.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    return seen


@pytest.fixture(scope="module")
def schnell(tmp_path_factory) -> Path:
    from tuner.config.families import write_tiny

    return write_tiny("flux-schnell", tmp_path_factory.mktemp("schnell") / "pipeline")


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_the_transformer_sees_what_the_pipeline_hands_it(make_cfg, tmp_path, schnell, variant):
    """One training step and FluxControlPipeline's denoising call, given the same noisy latents, control pixels,
    sigma and generator (the control's posterior sample is its first draw in both), hand the transformer the same
    128 features a token, ids, timestep, guidance (none on schnell) and prompt."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = [f"model.pretrained_model_name_or_path={schnell}"] if variant == "schnell" else []
    module = _module(make_cfg, tmp_path, "data.caption_dropout_probability=0", *path)
    seen = _hooked(module)
    torch.manual_seed(0)
    control = torch.rand(1, 3, 64, 64) * 2 - 1
    batch = {"pixels": torch.rand(1, 3, 64, 64) * 2 - 1, "control_pixels": control, "captions": [CAPTION]}
    with torch.no_grad():
        module.compute_loss(batch, module._step_generator(0))
    ours = seen[-1]
    assert ours["hidden_states"].shape == (1, 16, 128)  # 4 x 4 tokens of 64 target + 64 control features

    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the sigma as given: the shift is Flux's own test
    sigma = float(ours["timestep"][0])
    pipe(
        prompt=CAPTION,
        control_image=control,  # a tensor: encoded as is, no resizing
        latents=ours["hidden_states"][..., :64],
        sigmas=[sigma],
        num_inference_steps=1,
        guidance_scale=module.options.guidance,
        height=64,
        width=64,
        max_sequence_length=module.options.t5_max_length,
        generator=module._step_generator(0),
        output_type="latent",
    )
    theirs = seen[-1]
    assert pipe.transformer.config.in_channels == 128  # the pipeline reads 128 // 8 = 16 latent channels
    torch.testing.assert_close(ours["hidden_states"], theirs["hidden_states"], rtol=1e-5, atol=1e-5)
    for key in ("img_ids", "txt_ids"):
        assert torch.equal(ours[key], theirs[key]), key
    torch.testing.assert_close(ours["timestep"], theirs["timestep"])
    if variant == "dev":
        assert torch.equal(ours["guidance"], theirs["guidance"]) and ours["guidance"].tolist() == [1.0]
    else:
        assert ours["guidance"] is None and theirs["guidance"] is None
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
    torch.testing.assert_close(ours["pooled_projections"], theirs["pooled_projections"])
    # the control half is a posterior sample (the step generator's first draw), not the posterior's mode
    encoded = module.encode_pixels(control)
    sample = pack(module.model_inputs(encoded, module._step_generator(0)))
    torch.testing.assert_close(ours["hidden_states"][..., 64:], sample, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours["hidden_states"][..., 64:], pack(module.reference_inputs(encoded)))


def test_x_embedder_is_widened_with_zero_columns_so_step_0_is_the_base(make_cfg, demo_dir, tmp_path):
    from diffusers import FluxTransformer2DModel

    module = _module(make_cfg, tmp_path / "control")
    base = FluxTransformer2DModel.from_pretrained(demo_dir / "flux", subfolder="transformer")
    layer = module.transformer.x_embedder
    weight = layer.base_layer.weight  # (D, 128): the frozen widened layer under its LoRA
    assert weight.shape == (base.x_embedder.out_features, 128) and layer.lora_A["default"].in_features == 128
    assert torch.equal(weight[:, :64], base.x_embedder.weight) and weight[:, 64:].eq(0).all()
    assert torch.equal(layer.base_layer.bias, base.x_embedder.bias) and not weight.requires_grad
    config = module.transformer.config
    assert (config.in_channels, config.out_channels, base.config.in_channels) == (128, 64, 64)
    widen_x_embedder(base)
    widened = base.x_embedder
    widen_x_embedder(base)  # a control checkpoint (in_channels twice the output's) is kept as it is
    assert base.x_embedder is widened and base.config.in_channels == 128

    plain = build_module(prepare(make_cfg("model=flux", output_dir=tmp_path / "plain")), with_optimizer=False)
    noisy, t, cond = torch.randn(2, 16, 8, 8), torch.tensor([300.0, 800.0]), plain.encode_prompts([CAPTION] * 2)
    with torch.no_grad():
        expected = plain.denoise(noisy, t, cond, {})
        for control in (torch.randn(2, 16, 8, 8), torch.zeros(2, 16, 8, 8)):  # zero columns, LoRA B zero
            torch.testing.assert_close(module.denoise(noisy, t, cond, {"control_latents": control}), expected)


def test_x_embedder_is_a_lora_target_whatever_the_list(make_cfg, tmp_path):
    """The script's default (attention, the double blocks' feed-forwards, x_embedder), and x_embedder added to any
    list or preset."""
    default = {"attn.to_q", "attn.add_q_proj", "ff.net.0.proj", "ff_context.net.2", "x_embedder"}
    for given, expected in ((None, default), ("[to_q]", {"attn.to_q", "x_embedder"})):
        overrides = [f"model.lora.target_modules={given}"] if given else []
        module = _module(make_cfg, tmp_path / str(len(overrides)), *overrides)
        wrapped = {n for n, m in module.transformer.named_modules() if hasattr(m, "lora_A")}
        assert all(any(n.endswith(e) for n in wrapped) for e in expected), expected
        assert not any(n.endswith(("context_embedder", "proj_mlp")) for n in wrapped)
    assert "x_embedder" in FluxControlModule.lora_targets(["all"]) and "proj_mlp" in FluxControlModule.lora_targets(
        ["all"]
    )


def _sample(pipe, control, seed=0):
    return pipe(
        prompt=CAPTION,
        control_image=control,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images[0]


def test_train_py_trains_exports_and_the_lora_loads_into_the_base_control_pipeline(demo_dir, tmp_path):
    """``python train.py model=flux model.control=lora`` on the demo; its LoRA file (x_embedder's lora_A 128 wide) in
    FluxControlPipeline built from the BASE tiny FLUX.1 [dev] folder: load_lora_weights widens x_embedder, the
    control image then changes the output, and with the LoRA off it does not (the base's new columns are zero)."""
    from diffusers import FluxControlPipeline

    out = tmp_path / "run"
    res = run_cli(
        "train.py",
        *CONTROL,
        f"demo_assets_dir={demo_dir}",
        f"output_dir={out}",
        "max_train_steps=4",
        "optimizer.lr=5e-2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "callbacks.validation.num_inference_steps=2",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights["transformer.x_embedder.lora_A.weight"].shape[1] == 128
    assert weights["transformer.x_embedder.lora_B.weight"].abs().sum() > 0
    assert any(p.name == "grid.png" for p in (out / "validation").rglob("*.png"))
    assert "FluxControlPipeline" in (out / "README.md").read_text()

    pipe = FluxControlPipeline.from_pretrained(demo_dir / "flux")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.in_channels == 64
    FluxControlModule.load_lora(pipe, out)
    assert pipe.transformer.config.in_channels == 128 and pipe.transformer.x_embedder.base_layer.in_features == 128
    a, b = input_image(64, 64), Image.new("RGB", (64, 64), (20, 200, 20))
    assert np.abs(_sample(pipe, a) - _sample(pipe, b)).mean() > 1e-3
    pipe.disable_lora()
    np.testing.assert_allclose(_sample(pipe, a), _sample(pipe, b), atol=1e-6)


def test_a_full_fine_tune_exports_a_control_pipeline(make_cfg, tmp_path):
    """The exported pipeline's transformer is the widened one: FluxControlPipeline loads it as it is."""
    from diffusers import FluxControlPipeline

    out = tmp_path / "full"
    train(
        make_cfg(
            *CONTROL, "model.finetune=full", "max_train_steps=2", "callbacks.validation.enabled=false", output_dir=out
        )
    )
    pipe = FluxControlPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    config = pipe.transformer.config
    assert (config.in_channels, config.out_channels, pipe.transformer.proj_out.out_features) == (128, 64, 64)
    assert pipe.transformer.x_embedder.weight[:, 64:].abs().sum() > 0  # the control's columns trained
    assert _sample(pipe, input_image(64, 64)).shape == (64, 64, 3)


def test_resume_is_bit_identical(make_cfg, tmp_path):
    common = (*CONTROL, "optimizer.lr=5e-2", "checkpointing_steps=3", "callbacks.validation.enabled=false")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_cfg(*common, "max_train_steps=5", output_dir=straight))
    train(make_cfg(*common, "max_train_steps=3", output_dir=resumed))
    train(make_cfg(*common, "max_train_steps=5", "resume_from_checkpoint=latest", output_dir=resumed))
    a, b = (
        load_file(straight / "pytorch_lora_weights.safetensors"),
        load_file(resumed / "pytorch_lora_weights.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["transformer.x_embedder.lora_B.weight"].abs().sum() > 0


def test_validation_samples_with_its_input_as_the_control_image(make_cfg, tmp_path):
    """``image=`` (validation's input, one or a list of one) is the control image, fitted to the asked size (a
    128 x 80 input, 64 x 64 sample: 4 x 4 tokens); another input, other control features, the same noise."""
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=64, width=64, num_inference_steps=1, guidance_scale=3.5, negative_prompt="blurry")
    image = module.sample_image(
        pipe, CAPTION, image=input_image(80, 128), generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert image.size == (64, 64) and seen[-1]["hidden_states"].shape == (1, 16, 128) and len(seen) == 1
    assert seen[-1]["guidance"].tolist() == [3.5]
    green = [Image.new("RGB", (128, 80), (20, 200, 20))]
    module.sample_image(pipe, CAPTION, image=green, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(seen[0]["hidden_states"][..., :64], seen[1]["hidden_states"][..., :64])
    assert not torch.allclose(seen[0]["hidden_states"][..., 64:], seen[1]["hidden_states"][..., 64:])
    with pytest.raises(ValueError, match="control image"):
        module.sample_image(pipe, CAPTION, **kwargs)


def test_config_errors_before_anything_loads(make_cfg, demo_dir, tmp_path):
    elsewhere = tmp_path / "images"
    elsewhere.mkdir()
    for image in (demo_dir / "images").iterdir():
        (elsewhere / image.name).write_bytes(image.read_bytes())
    with pytest.raises(ConfigError, match=r"trains on \(target, control\) pairs: set data.conditioning.control.path"):
        prepare(make_cfg(*CONTROL, f"data.path={elsewhere}"))
    with pytest.raises(ConfigError, match="use model.finetune=lora or full"):
        prepare(make_cfg(*CONTROL, "model.finetune=lycoris"))
    with pytest.raises(ConfigError, match="has no control LoRA"):
        prepare(make_cfg("model=sd15", "model.control=lora"))
    with pytest.raises(ConfigError, match="control LoRA"):  # Kontext is a FluxModule too, but not FLUX.1 itself
        prepare(make_cfg("model=flux_kontext", "model.control=lora"))
    with pytest.raises(ValueError, match="nf4-bnb"):  # (nf4 needs CUDA: on a GPU this is what stops it)
        FluxControlModule(str(demo_dir / "flux"), "flux", base_model_precision="nf4-bnb")
