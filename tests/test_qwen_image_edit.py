"""Qwen-Image-Edit beyond the family matrix (tests/test_train.py), for both pipelines (Edit and Plus): the prompt
read with the input image, equal to the pipeline's own ``encode_prompt``; the transformer's inputs in one step
(target and reference tokens, img_shapes, sigma, prompt states and mask) equal to what the pipeline hands it; the
prediction over the target's tokens only; a dropped caption read as "" with the image; sampling at the asked
size; the reference count; the torchvision-free processor on a checkpoint's processor folder; LoRA presets; the
SimpleTuner import."""

import json

import pytest
import torch
from probes import denoiser_calls as _hooked
from probes import quiet_pipeline as _pipe

from models.qwen_image_edit import Qwen2VLImageTextProcessor, input_area, input_image
from tuner.config import ConfigError
from tuner.run import build_module, prepare

CAPTION = "move the square to the other side"


@pytest.fixture(scope="module")
def plus_dir(tmp_path_factory):
    from tuner.config.families import write_tiny

    return write_tiny("qwen-image-edit-plus", tmp_path_factory.mktemp("plus") / "qwen-image-edit-plus")


def _module(make_cfg, tmp_path, *overrides):
    return build_module(prepare(make_cfg("model=qwen_image_edit", *overrides, output_dir=tmp_path)), with_optimizer=False)


def _plus(make_cfg, tmp_path, plus_dir):
    return _module(make_cfg, tmp_path, f"model.pretrained_model_name_or_path={plus_dir}")


def _pixels(pipe, image) -> torch.Tensor:
    """An input image as the pipeline preprocesses it for its VAE: (1, 3, H, W) in [-1, 1]."""
    return pipe.image_processor.preprocess(image, image.height, image.width)


@pytest.mark.parametrize("plus", [False, True])
@torch.no_grad()
def test_the_transformer_sees_what_the_pipeline_hands_it(plus, make_cfg, tmp_path, plus_dir):
    """One denoising step of the pipeline (its input at the output's area) against ours at the same sigma: the
    same prompt states (read with the image), reference tokens after the target's, img_shapes, sigma and mask."""
    module = _plus(make_cfg, tmp_path, plus_dir) if plus else _module(make_cfg, tmp_path)
    assert module.plus == plus and type(module.pipeline()).__name__ == ("QwenImageEditPlusPipeline" if plus else "QwenImageEditPipeline")
    seen = _hooked(module)
    pipe = _pipe(module)
    image = input_image(64, 64)
    with input_area(pipe, 64 * 64):
        pipe(image=[image] if plus else image, prompt=CAPTION, height=64, width=64, num_inference_steps=2, output_type="latent")
    theirs = seen[1]
    sigma = float(theirs["timestep"][0])
    batch = {"reference_pixels": [_pixels(pipe, image)]}
    cond = module.encode_prompts([CAPTION], batch["reference_pixels"])  # as the shared step calls it
    pred = module.denoise(torch.randn(1, 16, 8, 8), torch.tensor([sigma * 1000]), cond, batch)
    ours = seen[-1]
    assert pred.shape == (1, 16, 8, 8)
    assert ours["timestep"].tolist() == pytest.approx([sigma])
    assert ours["img_shapes"] == theirs["img_shapes"] == [[(1, 4, 4), (1, 4, 4)]]  # the target's, then the input's
    assert ours["encoder_hidden_states_mask"] is None and theirs["encoder_hidden_states_mask"] is None
    assert ours["hidden_states"].shape == theirs["hidden_states"].shape == (1, 32, 64)
    # the input's tokens: its VAE latents' mode, normalised per channel, packed (the pipeline's _encode_vae_image)
    torch.testing.assert_close(ours["hidden_states"][:, 16:], theirs["hidden_states"][:, 16:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"], rtol=0, atol=0)


@torch.no_grad()
def test_prompts_are_the_pipelines_encode_prompt_each_with_its_image(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    pipe = _pipe(module)
    images = [input_image(64, 64), input_image(64, 64).rotate(90)]
    pixels = torch.cat([_pixels(pipe, i) for i in images])  # (2, 3, 64, 64)
    cond = module.encode_prompts([CAPTION, ""], [pixels])
    lengths = cond["prompt_mask"].sum(1).tolist()
    for i, image in enumerate(images):
        embeds, mask = pipe.encode_prompt([CAPTION, ""][i], image=image)
        assert mask is None and lengths[i] == embeds.shape[1]
        torch.testing.assert_close(cond["prompt_embeds"][i : i + 1, : lengths[i]], embeds, rtol=0, atol=0)
        assert not cond["prompt_embeds"][i, lengths[i] :].any()  # zero-padded to the batch's longest
    other = module.encode_prompts([CAPTION], [pixels[1:]])["prompt_embeds"]
    assert not torch.allclose(other[0], cond["prompt_embeds"][0, : other.shape[1]])  # the image changes the prompt


@torch.no_grad()
def test_the_prediction_covers_the_target_tokens_and_reads_the_reference(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    outputs = []
    module.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    noisy, t = torch.randn(2, 16, 8, 12), torch.tensor([700.0, 300.0])
    refs = torch.rand(2, 3, 64, 96) * 2 - 1
    cond = module.encode_prompts([CAPTION, "make it red"], [refs])
    pred = module.denoise(noisy, t, cond, {"reference_pixels": [refs]})
    assert outputs[-1].shape == (2, 24 + 24, 64) and pred.shape == (2, 16, 8, 12)
    from models.flux import unpack

    assert torch.equal(pred, unpack(outputs[-1][:, :24], 8, 12))  # the target's tokens; the input's dropped
    moved = module.denoise(noisy, t, cond, {"reference_pixels": [refs.flip(-1)]})
    assert not torch.allclose(moved, pred)  # the input's tokens reach the target's


@torch.no_grad()
def test_the_step_reads_each_prompt_with_its_input_a_dropped_caption_as_the_empty_prompt(make_cfg, tmp_path):
    """The shared step encodes the captions, as dropout left them, with the batch's input images."""
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    refs = torch.rand(2, 3, 64, 64) * 2 - 1
    batch = {"captions": ["", CAPTION], "pixels": torch.rand(2, 3, 64, 64) * 2 - 1, "reference_pixels": [refs]}
    module.compute_loss(batch, torch.Generator().manual_seed(0))
    expected = module.encode_prompts(["", CAPTION], [refs])
    n = int(expected["prompt_mask"].sum(1).max())
    torch.testing.assert_close(seen[-1]["encoder_hidden_states"], expected["prompt_embeds"][:, :n], rtol=0, atol=0)
    assert torch.equal(seen[-1]["encoder_hidden_states_mask"], expected["prompt_mask"][:, :n])  # "" is shorter


def test_validation_samples_at_the_asked_size_with_its_input_and_real_cfg(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    encoded = []
    original = module.vae.encode
    module.vae.encode = lambda x, *a, **k: (encoded.append(tuple(x.shape)), original(x, *a, **k))[1]
    pipe = _pipe(module)
    image = module.sample_image(pipe, CAPTION, image=[input_image(64, 64)], guidance_scale=4.0, height=64, width=64,
                                num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert image.size == (64, 64) and len(seen) == 4  # two steps of the prompt, then of the negative prompt ""
    assert encoded == [(1, 3, 1, 64, 64)]  # the input at the output's area, not the pipeline's 1 MP
    assert seen[0]["img_shapes"] == [[(1, 4, 4), (1, 4, 4)]]


def test_qwen_image_edit_takes_one_input_and_plus_up_to_three(make_cfg, tmp_path, plus_dir):
    refs = [torch.rand(1, 3, 64, 64) * 2 - 1 for _ in range(2)]
    with pytest.raises(ValueError, match="takes one input image"):
        _module(make_cfg, tmp_path / "edit").encode_prompts([CAPTION], refs)
    module = _plus(make_cfg, tmp_path / "plus", plus_dir)
    seen = _hooked(module)
    with torch.no_grad():
        cond = module.encode_prompts([CAPTION], refs)
        module.denoise(torch.randn(1, 16, 8, 8), torch.tensor([500.0]), cond, {"reference_pixels": refs})
    assert seen[-1]["img_shapes"] == [[(1, 4, 4)] * 3] and seen[-1]["hidden_states"].shape[1] == 48
    assert type(module).max_references == 3
    # refused before anything loads, from the checkpoint's pipeline class
    with pytest.raises(ConfigError, match="takes at most 1"):
        prepare(make_cfg("model=qwen_image_edit", f"data.conditioning.reference.path=[{tmp_path},{tmp_path}]"))
    prepare(make_cfg("model=qwen_image_edit", f"model.pretrained_model_name_or_path={plus_dir}",
                     f"data.conditioning.reference.path=[{tmp_path},{tmp_path}]", "callbacks.validation.enabled=false"))


def test_the_processor_loads_a_checkpoints_processor_folder_without_torchvision(tmp_path):
    """The real checkpoints' ``processor/`` (tokenizer files and ``preprocessor_config.json``, as Qwen2.5-VL's)
    loads offline; images become the VL model's patches and the image pad its tokens, as Qwen2VLProcessor does."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from models import tiny

    tiny.qwen_tokenizer().save_pretrained(tmp_path)
    Qwen2VLImageProcessorPil().save_pretrained(tmp_path)  # preprocessor_config.json, the real layout's
    assert not (tmp_path / "processor_config.json").exists()
    processor = Qwen2VLImageTextProcessor.from_pretrained(tmp_path)
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>go"], images=[input_image(56, 112)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 8]]  # 56 x 112 px in 14 px patches
    assert out["pixel_values"].shape == (32, 3 * 2 * 14 * 14)
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 8  # 32 patches, merged 2 x 2


@pytest.mark.parametrize(
    "preset,wrapped,unwrapped",
    [("attention", {"to_q", "add_k_proj", "to_out.0"}, {"img_mlp.net.2"}), ("all", {"img_mod.1", "txt_mlp.net.2"}, {"img_in"})],
)
def test_lora_target_presets(preset, wrapped, unwrapped, make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, f"model.lora.target_modules=[{preset}]")
    names = {n for n, m in module.transformer.named_modules() if hasattr(m, "lora_A")}
    assert all(any(n.endswith(w) for n in names) for w in wrapped)
    assert not any(n.endswith(u) for n in names for u in unwrapped)


def test_simpletuner_qwen_edit_flavours_import_to_the_edit_family(tmp_path):
    from tuner.interop.simpletuner import convert

    cases = {"edit-v1": "Qwen/Qwen-Image-Edit", "edit-v2": "Qwen/Qwen-Image-Edit-2509", "edit-v2+": "Qwen/Qwen-Image-Edit-2509",
             "edit-v3": "Qwen/Qwen-Image-Edit-2511"}
    for flavour, repo in cases.items():
        config = tmp_path / f"{flavour}.json"
        config.write_text(json.dumps({"model_family": "qwen_image", "model_flavour": flavour, "model_type": "lora"}))
        res = convert(config)
        assert res.defaults["model"] == "qwen_image_edit" and res.defaults["preset"] == "qwen-image-edit", flavour
        assert res.get("model.pretrained_model_name_or_path") == repo, flavour
    config = tmp_path / "t2i.json"
    config.write_text(json.dumps({"model_family": "qwen_image", "model_flavour": "v1.0", "model_type": "lora"}))
    assert convert(config).defaults["model"] == "qwen_image"  # the text-to-image flavours stay Qwen-Image


def test_sampling_inputs_keep_a_loaded_pipelines_input_at_the_asked_area(demo_dir, tmp_path):
    """The tests' generate() and the learning benchmark call the pipeline itself, with ``sampling_inputs``: it
    prepares the pipeline so that its input stays at 64 x 64 (the pipeline's own 1 MP otherwise), and the
    pipeline stays what it was: its class, LoRA loading, its saved layout."""
    from conftest import generate
    from diffusers import DiffusionPipeline, QwenImageEditPipeline

    pipe = DiffusionPipeline.from_pretrained(demo_dir / "qwen_image_edit")
    pipe.set_progress_bar_config(disable=True)
    seen = _hooked(pipe)
    with torch.no_grad():
        pipe(image=input_image(64, 64), prompt=CAPTION, height=64, width=64, num_inference_steps=1, output_type="latent")
    assert seen[-1]["img_shapes"] == [[(1, 4, 4), (1, 64, 64)]]  # unprepared: the input at 1024 x 1024
    assert generate(pipe).shape == (64, 64, 3)
    assert seen[-1]["img_shapes"] == [[(1, 4, 4), (1, 4, 4)]]  # the input's tokens at the output's size
    assert type(pipe) is QwenImageEditPipeline  # its own class: generate() finds its family by it
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "QwenImageEditPipeline"
