"""Z-Image beyond the family matrix (tests/test_train.py): Qwen3's templated prompt, second-to-last layer and
per-prompt real tokens as ZImagePipeline's own ``encode_prompt`` gives them; the transformer's inputs in one
denoising step (list inputs, timestep 1 - sigma) and the sign of its output against the pipeline's step; CFG as the
pipeline does it (one batched call, off at guidance 0); the prompt length at sampling; caption dropout; the fixed
and dynamic shift; LoRA presets; the SimpleTuner import."""

import json
import math

import pytest
import torch
from probes import quiet_pipeline as _pipe

from models import objectives as obj
from models.z_image import caption_features, template
from tuner.run import build_module, prepare

CAPTION = "a red circle on white"


def _module(make_cfg, tmp_path, *overrides):
    return build_module(prepare(make_cfg("model=z_image", *overrides, output_dir=tmp_path)), with_optimizer=False)


def _hooked(module) -> list[tuple]:
    seen = []
    module.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)), with_kwargs=True)
    return seen


def test_prompts_are_the_pipelines_encode_prompt(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    cond = module.encode_prompts([CAPTION, ""])
    assert cond["prompt_embeds"].shape == (2, 512, 32) and cond["attention_mask"].shape == (2, 512)
    embeds, negative = _pipe(module).encode_prompt(CAPTION, negative_prompt="", do_classifier_free_guidance=True)
    ours = caption_features(cond["prompt_embeds"], cond["attention_mask"], torch.float32)
    torch.testing.assert_close(ours[0], embeds[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], negative[0], rtol=1e-5, atol=1e-6)
    # the chat template with thinking on: no empty think block; each byte of it one tiny token
    text = template(module.tokenizer, CAPTION)
    assert text == f"<|im_start|>user\n{CAPTION}<|im_end|>\n<|im_start|>assistant\n" and "<think>" not in text
    assert embeds[0].shape[0] == int(cond["attention_mask"][0].sum()) == len(module.tokenizer(text).input_ids)
    # the second-to-last hidden layer, not the last (normed) one
    tokens = module.tokenizer([text], padding="max_length", max_length=512, return_tensors="pt")
    last = module.text_encoder(**tokens).last_hidden_state[0][tokens.attention_mask[0].bool()]
    assert not torch.allclose(last, embeds[0])


def test_the_transformer_sees_what_the_pipeline_hands_it_and_its_step_is_our_velocity(make_cfg, tmp_path):
    """One pipeline step from sigma to 0 lands on x - sigma * v: our ``denoise`` is the velocity the scheduler
    integrates (the transformer's output negated), at the pipeline's timestep (1 - sigma) and inputs."""
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    out = _pipe(module)(
        CAPTION,
        height=64,
        width=64,
        num_inference_steps=1,
        sigmas=[0.75],
        guidance_scale=0.0,
        latents=x.clone(),
        output_type="latent",
    ).images
    assert len(seen) == 1  # guidance 0: no CFG pass
    (latents, t, captions), kwargs = seen[0][0], seen[0][1]
    sigma = float(obj.shift_sigmas(torch.tensor(0.75), 3.0))  # Turbo's fixed shift, from its scheduler config
    assert module.noise.shift == 3.0 and module.flow_shift_for(x) is None
    assert float(t[0]) == pytest.approx(1 - sigma)  # the transformer's time runs from noise (0) to image (1)
    velocity = module.denoise(x, torch.tensor([sigma * 1000]), module.encode_prompts([CAPTION]), {})
    (our_latents, our_t, our_captions), our_kwargs = seen[1]
    assert torch.equal(our_t, t.to(our_t.dtype)) and our_kwargs.keys() == {"return_dict"} and "return_dict" in kwargs
    assert [tuple(v.shape) for v in our_latents] == [tuple(v.shape) for v in latents] == [(16, 1, 8, 8)]
    assert torch.equal(our_latents[0], latents[0])
    torch.testing.assert_close(our_captions[0], captions[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, x - sigma * velocity, rtol=1e-5, atol=1e-5)
    assert module.denoiser_level(t) == pytest.approx(sigma)  # what split-schedule experts read off the hook


def test_a_batch_of_prompts_of_different_lengths_denoises_as_each_alone(make_cfg, tmp_path):
    """The transformer takes one caption tensor per sample and pads them itself: a batch mixes prompt lengths."""
    module = _module(make_cfg, tmp_path)
    captions = [CAPTION, "a much longer caption about a blue square drawn on a plain white background"]
    cond = module.encode_prompts(captions)
    assert cond["attention_mask"].sum(1)[1] > cond["attention_mask"].sum(1)[0] + 32  # padded to different sizes
    x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([300.0, 800.0])
    both = module.denoise(x, t, cond, {})
    for i in range(2):
        alone = module.denoise(x[i : i + 1], t[i : i + 1], {k: v[i : i + 1] for k, v in cond.items()}, {})
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_validation_samples_with_the_pipelines_cfg_on_the_negative_prompt(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    pipe = _pipe(module)
    image = module.sample_image(
        pipe, CAPTION, negative_prompt="blurry", height=64, width=64, num_inference_steps=1, guidance_scale=4.0
    )
    assert image.size == (64, 64)
    (latents, t, captions), _ = seen[-1]
    assert len(seen) == 1 and len(latents) == len(captions) == 2  # one call: the prompt, then the negative prompt
    negative = module.encode_prompts(["blurry"])
    torch.testing.assert_close(
        captions[1],
        caption_features(negative["prompt_embeds"], negative["attention_mask"], torch.float32)[0],
        rtol=1e-5,
        atol=1e-6,
    )
    module.sample_image(pipe, CAPTION, height=64, width=64, num_inference_steps=1, guidance_scale=0.0)
    assert len(seen) == 2 and len(seen[-1][0][2]) == 1  # guidance 0: the prompt alone


def test_sampling_uses_the_prompt_length_the_run_trains_with(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, "model.options.max_sequence_length=48")
    seen = _hooked(module)
    long = "a long caption " * 8  # the templated prompt is over 48 tokens: both cut it at 48
    assert module.encode_prompts([long])["attention_mask"].sum() == 48
    module.sample_image(_pipe(module), long, height=64, width=64, num_inference_steps=1, guidance_scale=0.0)
    assert seen[-1][0][2][0].shape[0] == 48


def test_a_dropped_caption_gets_the_empty_prompts_embeddings_and_mask(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    cond = module.encode_prompts([CAPTION, "a blue square on white"])
    dropped = module.drop_cond(cond, [True, False])
    empty = module.encode_prompts([""])
    for key in ("prompt_embeds", "attention_mask"):
        assert torch.equal(dropped[key][:1], empty[key]) and torch.equal(dropped[key][1:], cond[key][1:]), key
    _, negative = _pipe(module).encode_prompt(CAPTION, negative_prompt="", do_classifier_free_guidance=True)
    features = caption_features(dropped["prompt_embeds"], dropped["attention_mask"], torch.float32)
    torch.testing.assert_close(features[0], negative[0], rtol=1e-5, atol=1e-6)  # what sampling's unconditional gets


def test_a_dynamic_shift_config_shifts_as_the_pipeline_and_a_fixed_shift_overrides_it(make_cfg, tmp_path):
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    module = _module(make_cfg, tmp_path)
    module.noise.config.update(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    for side in (8, 64, 128):
        mu = calculate_shift((side // 2) ** 2, 256, 4096, 0.5, 1.15)
        assert module.flow_shift_for(torch.zeros(1, 16, side, side)) == pytest.approx(math.exp(mu))
    fixed = _module(make_cfg, tmp_path / "fixed", "model.flow_shift=2.0")
    fixed.noise.config.update(use_dynamic_shifting=True)
    assert fixed.flow_shift_for(torch.zeros(1, 16, 8, 8)) is None and fixed.noise.shift == 2.0


@pytest.mark.parametrize(
    ("preset", "wrapped", "left"),
    [
        ("attention", {"to_q", "to_k", "to_v", "to_out.0"}, {"w1", "w2", "w3", "2-1", "linear"}),
        ("attention+ffn", {"to_q", "to_out.0", "w1", "w2", "w3"}, {"2-1", "linear", "cap_embedder.1"}),
        ("all", {"to_q", "w1", "w2", "w3", "2-1", "linear", "cap_embedder.1"}, {"adaLN_modulation.0"}),
    ],
)
def test_lora_target_presets(make_cfg, tmp_path, preset, wrapped, left):
    module = _module(make_cfg, tmp_path, f"model.lora.target_modules=[{preset}]")
    names = [n for n, m in module.transformer.named_modules() if hasattr(m, "lora_A")]
    short = {n.rsplit(".", 1)[-1] for n in names} | {".".join(n.rsplit(".", 2)[-2:]) for n in names}
    assert wrapped <= short and not left & short
    blocks = {n.split(".")[0] for n in names if n.split(".")[0] in ("layers", "noise_refiner", "context_refiner")}
    assert blocks == {"layers", "noise_refiner", "context_refiner"}  # every block: the main layers and both refiners


ADAPTER = "ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v{}.safetensors"


@pytest.mark.parametrize(
    ("flavour", "extra", "preset", "path", "adapter"),
    [
        ("turbo", {}, "z-image", "Tongyi-MAI/Z-Image-Turbo", ADAPTER.format(1)),
        ("turbo-ostris-v2", {}, "z-image", "Tongyi-MAI/Z-Image-Turbo", ADAPTER.format(2)),
        ("turbo", {"disable_assistant_lora": True}, "z-image", "Tongyi-MAI/Z-Image-Turbo", None),
        ("turbo", {"assistant_lora_path": "me/adapter", "assistant_lora_weight_name": "a.safetensors"}, "z-image",
         "Tongyi-MAI/Z-Image-Turbo", "me/adapter/a.safetensors"),
        ("base", {}, "z-image-base", "Tongyi-MAI/Z-Image", "unset"),
    ],
)  # fmt: skip
def test_simpletuner_z_image_imports_to_its_preset_and_assistant_lora(tmp_path, flavour, extra, preset, path, adapter):
    """SimpleTuner's Turbo flavours train with Ostris's assistant LoRA by default (v1 or v2 by flavour); tuner's
    training adapter takes it, or none where it is disabled; the base has none."""
    from tuner.interop.simpletuner import convert

    config = tmp_path / "z_image.json"
    config.write_text(json.dumps({"model_family": "z_image", "model_flavour": flavour, "model_type": "lora", **extra}))
    res = convert(config)
    assert res.defaults["model"] == "z_image" and res.defaults["preset"] == preset
    assert res.get("model.pretrained_model_name_or_path") == path
    options = res.values.get("model", {}).get("options", {})
    assert options.get("training_adapter", "unset") == adapter
    assert not any("assistant" in key for key, _ in res.unmapped)


def test_the_learnable_transformer_is_twice_as_wide_as_its_patch(tmp_path):
    """models/learnable.reshape_transformer reads Z-Image's own config keys (dim, n_heads, all_patch_size): more heads
    of the same width, so the rotary axes (summing to the head width) stay, and from_pretrained loads it."""
    from diffusers import ZImageTransformer2DModel

    from models.learnable import WIDTH_OVER_PATCH
    from tuner.config.families import write_tiny

    path = write_tiny("z_image", tmp_path / "z_image", learnable=True)
    transformer = ZImageTransformer2DModel.from_pretrained(path, subfolder="transformer")
    config = transformer.config
    assert config.dim >= WIDTH_OVER_PATCH * config.in_channels * 2 * 2 and config.n_heads == config.n_kv_heads
    assert config.dim // config.n_heads == sum(config.axes_dims) == 16  # the tiny one's head width, kept
    assert json.loads((path / "learnable.json").read_text())["transformer_width"] == config.dim
