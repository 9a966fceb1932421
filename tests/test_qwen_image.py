"""Qwen-Image beyond the family matrix (tests/test_train.py): the prompt embeddings and their mask as
QwenImagePipeline's own ``encode_prompt`` builds them (template, last layer, dropped template tokens), padded
to a fixed length for the cache; the transformer's inputs in one denoising step against the pipeline's call;
a padded batch denoising as its prompts would alone; the per-channel latent normalisation; real CFG with the
negative prompt at validation; caption dropout; the dynamic shift; LoRA presets; the learnable VAE; the
SimpleTuner import."""

import json
import math

import numpy as np
import pytest
import torch
from probes import denoiser_calls as _hooked
from probes import quiet_pipeline as _pipe

from models.qwen_image import PROMPT_TEMPLATE, QWEN_SCHEDULER, TEMPLATE_TOKENS
from tuner.run import build_module, prepare

CAPTION = "a red circle on white"
OTHER = "top left square"
LENGTH = 512  # max_sequence_length, the pipeline's default


def _module(make_cfg, tmp_path, *overrides):
    return build_module(prepare(make_cfg("model=qwen_image", *overrides, output_dir=tmp_path)), with_optimizer=False)


@torch.no_grad()
def test_prompts_are_the_pipelines_encode_prompt(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    pipe = _pipe(module)
    assert (PROMPT_TEMPLATE, TEMPLATE_TOKENS) == (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)
    captions = [CAPTION, "", OTHER]
    cond = module.encode_prompts(captions)
    assert cond["prompt_embeds"].shape == (3, LENGTH, 32) and cond["prompt_mask"].shape == (3, LENGTH)
    # one at a time, as the pipeline encodes a prompt: no padding, so it hands over no mask
    for i, caption in enumerate(captions):
        embeds, mask = pipe.encode_prompt(caption, max_sequence_length=LENGTH)
        n = embeds.shape[1]
        assert mask is None and cond["prompt_mask"][i].tolist() == [1] * n + [0] * (LENGTH - n)
        # (padded in a batch, a prompt's states differ from its own by float rounding alone)
        torch.testing.assert_close(cond["prompt_embeds"][i : i + 1, :n], embeds, rtol=1e-5, atol=1e-6)
        assert not cond["prompt_embeds"][i, n:].any()  # zeros past the prompt, as the pipeline pads
    # the batch, as the pipeline pads it to its longest prompt with its mask: exactly
    embeds, mask = pipe.encode_prompt(captions, max_sequence_length=LENGTH)
    assert torch.equal(cond["prompt_mask"][:, : mask.shape[1]], mask)
    torch.testing.assert_close(cond["prompt_embeds"][:, : embeds.shape[1]], embeds, rtol=0, atol=0)
    # the template's first 34 tokens are dropped, and the states are the last layer's
    templated = module.tokenizer([PROMPT_TEMPLATE.format(CAPTION)], return_tensors="pt")
    states = module.text_encoder(**templated, output_hidden_states=True).hidden_states
    n = templated.input_ids.shape[1] - TEMPLATE_TOKENS
    torch.testing.assert_close(cond["prompt_embeds"][0, :n], states[-1][0, TEMPLATE_TOKENS:], rtol=0, atol=0)
    assert not torch.allclose(cond["prompt_embeds"][0, :n], states[-2][0, TEMPLATE_TOKENS:])


@torch.no_grad()
def test_the_transformer_sees_what_the_pipeline_hands_it(make_cfg, tmp_path):
    """At the same sigma, our training call and QwenImagePipeline's denoising call give the transformer the same
    timestep (sigma in [0, 1]), img_shapes, prompt states and mask (None: one prompt has no padding)."""
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    pipe = _pipe(module)
    pipe(CAPTION, height=64, width=64, num_inference_steps=2, output_type="latent")
    assert len(seen) == 2  # no negative prompt: no CFG pass
    theirs = seen[1]
    sigma = float(theirs["timestep"][0])  # the second step's: shifted for 16 tokens, stretched to shift_terminal
    assert sigma == pytest.approx(float(pipe.scheduler.timesteps[1]) / 1000) and 0 < sigma < 1
    module.denoise(torch.randn(1, 16, 8, 8), torch.tensor([sigma * 1000]), module.encode_prompts([CAPTION]), {})
    ours = seen[-1]
    assert ours["timestep"].tolist() == pytest.approx([sigma])  # both hand the transformer sigma in [0, 1]
    assert ours["img_shapes"] == theirs["img_shapes"] == [[(1, 4, 4)]]
    assert ours["encoder_hidden_states_mask"] is None and theirs["encoder_hidden_states_mask"] is None
    assert ours.get("guidance") is None and theirs.get("guidance") is None
    assert ours["hidden_states"].shape == theirs["hidden_states"].shape == (1, 16, 64)
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"], rtol=0, atol=0)


@torch.no_grad()
def test_a_padded_batch_denoises_as_its_prompts_alone(make_cfg, tmp_path):
    """The cache pads every prompt to 512 tokens; ``denoise`` cuts a batch to its longest prompt and masks the
    rest, so each row comes out as that prompt alone would (what the pipeline computes for it)."""
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    cond = module.encode_prompts([CAPTION, ""])  # 149 and 128 tokens with the tiny byte-level tokenizer
    noisy, t = torch.randn(2, 16, 8, 8), torch.tensor([600.0, 600.0])
    both = module.denoise(noisy, t, cond, {})
    longest = int(cond["prompt_mask"].sum(1).max())
    assert seen[-1]["encoder_hidden_states"].shape[1] == longest
    assert torch.equal(seen[-1]["encoder_hidden_states_mask"], cond["prompt_mask"][:, :longest])
    for i in range(2):
        alone = module.denoise(noisy[i : i + 1], t[:1], {k: v[i : i + 1] for k, v in cond.items()}, {})
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_latents_are_normalised_per_channel_as_the_pipeline_undoes_it(make_cfg, tmp_path):
    """(z - latents_mean) / latents_std, per channel: with the learnable VAE (an 8x8 box filter with unit-variance
    latents) an image comes back as its 8x8 blocks through our decode, and the latents are unit-variance."""
    from models.learnable_vae import toy_images
    from models.learnable_vae_qwen import make_qwen_vae

    module = _module(make_cfg, tmp_path)
    module.vae, _ = make_qwen_vae()
    images = toy_images(4, 64, torch.Generator().manual_seed(7))
    encoded = module.encode_pixels(images)
    assert encoded.shape == (4, 32, 8, 8)  # mean and log-variance, the frame axis dropped for the cache
    latents = module.model_inputs(encoded, torch.Generator().manual_seed(0))
    assert 0.7 < float(latents.std()) < 1.3 and abs(float(latents.mean())) < 0.3
    decoded = module.decode_latents(_pipe(module), latents[:1, :, None])  # (1, 16, 1, h, w), as the pipeline's
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images[:1], 8), scale_factor=8)
    expected = ((blocks[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255)
    assert np.abs(np.asarray(decoded, dtype=np.float32) - expected.numpy()).max() <= 1.5


def test_validation_samples_with_real_cfg_as_the_pipeline_does(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    pipe = _pipe(module)
    common = dict(height=64, width=64, num_inference_steps=2)
    ours = module.sample_image(pipe, CAPTION, negative_prompt="blurry", guidance_scale=4.0, generator=torch.Generator().manual_seed(0), **common)
    assert ours.size == (64, 64) and len(seen) == 4  # two steps of the prompt, then the negative prompt
    negative = module.encode_prompts(["blurry"])
    n = int(negative["prompt_mask"].sum())
    torch.testing.assert_close(seen[1]["encoder_hidden_states"], negative["prompt_embeds"][:, :n], rtol=0, atol=0)
    theirs = pipe(CAPTION, negative_prompt="blurry", true_cfg_scale=4.0, generator=torch.Generator().manual_seed(0), **common)
    assert np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs.images[0], dtype=np.int16)).max() <= 1
    seen.clear()
    module.sample_image(pipe, CAPTION, negative_prompt=None, guidance_scale=1.0, **common)
    assert len(seen) == 2  # guidance 1: no unconditional pass
    seen.clear()
    module.sample_image(pipe, CAPTION, negative_prompt=None, guidance_scale=4.0, **common)
    assert len(seen) == 4  # no negative prompt set: the empty one, what caption dropout trains


def test_a_dropped_caption_gets_the_empty_prompts_embeddings_and_mask(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    cond = module.encode_prompts([CAPTION, OTHER])
    dropped = module.drop_cond(cond, [True, False])
    empty = module.encode_prompts([""])
    for key in ("prompt_embeds", "prompt_mask"):
        assert torch.equal(dropped[key][:1], empty[key]) and torch.equal(dropped[key][1:], cond[key][1:]), key
    assert int(dropped["prompt_mask"][0].sum()) < int(cond["prompt_mask"][0].sum())  # the empty prompt is shorter


def test_the_shift_is_the_pipelines_and_a_fixed_shift_overrides_it(make_cfg, demo_dir, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    config = FlowMatchEulerDiscreteScheduler.load_config(demo_dir / "qwen_image", subfolder="scheduler")
    assert {k: config[k] for k in QWEN_SCHEDULER} == QWEN_SCHEDULER  # Qwen/Qwen-Image's
    module = _module(make_cfg, tmp_path)
    for side in (8, 64, 128):
        mu = calculate_shift((side // 2) ** 2, 256, 8192, 0.5, 0.9)
        assert module.flow_shift_for(torch.zeros(1, 16, side, side)) == pytest.approx(math.exp(mu))
    assert _module(make_cfg, tmp_path / "fixed", "model.flow_shift=2.0").flow_shift_for(torch.zeros(1, 16, 8, 8)) is None


@pytest.mark.parametrize(
    "preset,wrapped,unwrapped",
    [
        ("attention", {"to_q", "add_k_proj", "to_add_out", "to_out.0"}, {"img_mlp.net.2", "img_mod.1"}),
        ("attention+ffn", {"to_v", "img_mlp.net.0.proj", "txt_mlp.net.2"}, {"img_mod.1", "txt_mod.1"}),
        ("all", {"add_q_proj", "txt_mlp.net.0.proj", "img_mod.1", "txt_mod.1"}, {"img_in", "txt_in", "proj_out"}),
    ],
)
def test_lora_target_presets(preset, wrapped, unwrapped, make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, f"model.lora.target_modules=[{preset}]")
    names = {n for n, m in module.transformer.named_modules() if hasattr(m, "lora_A")}
    assert all(any(n.endswith(w) for n in names) for w in wrapped)
    assert not any(n.endswith(u) for n in names for u in unwrapped)


def test_the_learnable_vae_is_deterministic_unit_variance_and_invertible(tmp_path):
    from diffusers import AutoencoderKLQwenImage

    from models.learnable_vae import toy_images
    from tuner.tiny import main

    main(["qwen_image", str(tmp_path / "learnable"), "--learnable"])
    vae = AutoencoderKLQwenImage.from_pretrained(tmp_path / "learnable", subfolder="vae")
    images = toy_images(16, 64, torch.Generator().manual_seed(123))  # other images than the stats were set on
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        posterior = vae.encode(images[:, :, None]).latent_dist
        decoded = vae.decode(posterior.mean).sample[:, :, 0]
    latents = (posterior.mean - mean) / std
    assert float((posterior.std / std).max()) < 0.01  # nearly deterministic in every channel
    assert abs(float(latents.mean())) < 0.15 and 0.8 < float(latents.std()) < 1.25
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 8), scale_factor=8)
    assert float((decoded - blocks).abs().max()) < 1e-3
    measured = json.loads((tmp_path / "learnable" / "learnable.json").read_text())
    assert measured["transformer_width"] == 128  # twice its 64-wide packed token (not 4x for its patch_size 2)


def test_simpletuner_qwen_image_imports_to_the_qwen_image_preset(tmp_path):
    from tuner.interop.simpletuner import convert

    for flavour, repo in (("v1.0", "Qwen/Qwen-Image"), ("v2.0", "Qwen/Qwen-Image-2512"), ("", "Qwen/Qwen-Image-2512")):
        config = tmp_path / f"qwen{flavour}.json"
        config.write_text(json.dumps({"model_family": "qwen_image", "model_flavour": flavour, "model_type": "lora"}))
        res = convert(config)
        assert res.defaults["model"] == "qwen_image" and res.defaults["preset"] == "qwen-image"
        assert res.get("model.pretrained_model_name_or_path") == repo, flavour
