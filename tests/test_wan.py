"""Wan beyond the family matrix (tests/test_train.py): the prompt embeddings as WanPipeline's own ``encode_prompt``
builds them (cleaned, 512 tokens, zero past each prompt); the transformer's inputs in one denoising step against
the pipeline's call, for 1- and 5-frame clips, Wan 2.1 and Wan 2.2 TI2V-5B (48 channels at 1/16, timesteps per
token); the per-channel latent normalisation on images and clips; the scheduler's flow_shift; LoRA presets; one
Wan 2.2 A14B expert; the SimpleTuner import."""

import json

import numpy as np
import pytest
import torch
from probes import denoiser_calls as _hooked
from probes import quiet_pipeline as _pipe

from tuner.config.families import write_tiny
from tuner.run import build_module, prepare

CAPTION = "a red circle on white"
MESSY = "  a &amp;lt;blue&amp;gt;   square\n\n at  the top  "  # HTML escapes and runs of whitespace
LENGTH = 512  # max_sequence_length, WanPipeline's default


def _module(make_cfg, tmp_path, *overrides, variant: str | None = None):
    if variant is not None:
        path = write_tiny(variant, tmp_path / "tiny" / variant)
        overrides = (f"model.pretrained_model_name_or_path={path}", *overrides)
        if variant == "wan22-ti2v":  # its VAE's 16x and the 2x2 patch
            overrides = ("data.bucket_step=32", *overrides)
    return build_module(prepare(make_cfg("model=wan", *overrides, output_dir=tmp_path / "out")), with_optimizer=False)


@torch.no_grad()
def test_prompts_are_the_pipelines_encode_prompt(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    pipe = _pipe(module)
    captions = [CAPTION, "", MESSY]
    cond = module.encode_prompts(captions)
    assert list(cond) == ["prompt_embeds"] and cond["prompt_embeds"].shape == (3, LENGTH, 32)
    embeds, negative = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=LENGTH)
    assert negative is None
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    # zeros past each prompt's real tokens (its "</s>" included), as the pipeline pads
    real = module.tokenizer(module.pipeline_prompts(captions), padding="max_length", max_length=LENGTH).attention_mask
    for row, mask in zip(cond["prompt_embeds"], real, strict=True):
        n = sum(mask)
        assert row[:n].abs().sum(-1).min() > 0 and not row[n:].any()
    # the pipeline's cleaning: unescaped HTML, whitespace runs collapsed and stripped
    assert module.pipeline_prompts([MESSY]) == ["a <blue> square at the top"]
    raw = module.tokenizer([MESSY], padding="max_length", max_length=LENGTH, return_tensors="pt")
    assert int(raw.attention_mask.sum()) != sum(real[2])


@pytest.mark.parametrize(
    "variant,frames,latent_shape",
    [
        ("wan21", 1, (1, 16, 1, 8, 8)),
        ("wan21", 5, (1, 16, 2, 8, 8)),
        ("wan22-ti2v", 1, (1, 48, 1, 4, 4)),
        ("wan22-ti2v", 9, (1, 48, 3, 4, 4)),
    ],
)
@torch.no_grad()
def test_the_transformer_sees_what_the_pipeline_hands_it(variant, frames, latent_shape, make_cfg, tmp_path):
    """At the same sigma, our training call and WanPipeline's denoising call give the transformer the same
    latents' shape (B, C, f, h, w), timestep (sigma * 1000; per token for TI2V-5B) and prompt states."""
    module = _module(make_cfg, tmp_path, variant=variant)
    seen = _hooked(module)
    pipe = _pipe(module)
    pipe(CAPTION, height=64, width=64, num_frames=frames, num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    assert len(seen) == 2  # guidance 1: no CFG pass
    theirs = seen[1]
    t = float(pipe.scheduler.timesteps[1])
    # sigma * 1000 (shifted by flow_shift), which UniPC truncates to an integer: training's are real numbers
    assert t == int(float(pipe.scheduler.sigmas[1]) * 1000) and 0 < t < 1000
    noisy = torch.randn(latent_shape)  # built by hand: the latents of a `frames`-frame 64 x 64 clip
    module.denoise(noisy, torch.tensor([t]), module.encode_prompts([CAPTION]), {})
    ours = seen[-1]
    assert ours["hidden_states"].shape == theirs["hidden_states"].shape == latent_shape
    tokens = latent_shape[2] * (latent_shape[3] // 2) * (latent_shape[4] // 2)
    expected = (1, tokens) if variant == "wan22-ti2v" else (1,)  # expand_timesteps: one per token
    assert ours["timestep"].shape == theirs["timestep"].shape == expected
    torch.testing.assert_close(ours["timestep"].float(), theirs["timestep"].float(), rtol=0, atol=1e-3)
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"], rtol=0, atol=0)
    assert ours.get("encoder_hidden_states_image") is None and theirs.get("encoder_hidden_states_image") is None


@torch.no_grad()
def test_latents_are_normalised_per_channel_as_the_pipeline_undoes_it(make_cfg, tmp_path):
    """(z - latents_mean) / latents_std, per channel: with the learnable VAE (an 8x8 box filter with unit-variance
    latents) an image comes back as its 8x8 blocks through our decode; images are 1-frame clips, clips 4k + 1."""
    from models.learnable_vae import toy_images
    from models.learnable_vae_wan import make_wan_vae

    module = _module(make_cfg, tmp_path)
    assert (module.video, module.frame_multiple) == (True, 4)
    clip = module.encode_pixels(torch.rand(2, 3, 5, 64, 64) * 2 - 1)  # the tiny Wan 2.1 VAE: 4x in time
    assert clip.shape == (2, 32, 2, 8, 8)
    module.vae, _ = make_wan_vae(module.vae.config)
    images = toy_images(4, 64, torch.Generator().manual_seed(7))
    encoded = module.encode_pixels(images)
    assert encoded.shape == (4, 32, 1, 8, 8)  # mean and log-variance of 1-frame clips
    latents = module.model_inputs(encoded, torch.Generator().manual_seed(0))
    assert latents.shape == (4, 16, 1, 8, 8)
    assert 0.7 < float(latents.std()) < 1.3 and abs(float(latents.mean())) < 0.3
    mean = torch.tensor(module.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(module.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents * std + mean, encoded[:, :16], rtol=0, atol=1e-3)  # the posterior's mean
    decoded = module.decode_latents(_pipe(module), latents[:1])
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images[:1], 8), scale_factor=8)
    expected = ((blocks[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255)
    assert np.abs(np.asarray(decoded, dtype=np.float32) - expected.numpy()).max() <= 1.5


@torch.no_grad()
def test_validation_returns_the_pipelines_clip(make_cfg, tmp_path):
    """``sample_image`` samples an options.validation_frames clip with the pipeline's CFG and returns its frames: the
    pipeline's own frames for the same seed (a 1-frame clip is one image)."""
    module = _module(make_cfg, tmp_path)
    pipe = _pipe(module)
    kwargs = dict(height=64, width=64, num_inference_steps=2, guidance_scale=3.0)
    clip = module.sample_image(pipe, CAPTION, generator=torch.Generator().manual_seed(3), **kwargs)
    assert isinstance(clip, list) and len(clip) == module.options.validation_frames == 9
    theirs = pipe(CAPTION, num_frames=9, output_type="np", generator=torch.Generator().manual_seed(3), **kwargs).frames[0]
    ours = np.stack([np.asarray(frame, dtype=np.float32) for frame in clip])
    assert ours.shape == (9, 64, 64, 3) and np.abs(ours - theirs * 255).max() <= 1.0
    image = module.sample_image(pipe, CAPTION, num_frames=1, generator=torch.Generator().manual_seed(3), **kwargs)
    assert image.size == (64, 64)


def test_the_shift_is_the_schedulers_flow_shift_and_a_fixed_shift_overrides_it(make_cfg, tmp_path):
    assert _module(make_cfg, tmp_path).noise.shift == 3.0  # Wan 2.1's UniPC flow_shift
    assert _module(make_cfg, tmp_path, variant="wan22-ti2v").noise.shift == 5.0
    assert _module(make_cfg, tmp_path, "model.flow_shift=2.0").noise.shift == 2.0


@pytest.mark.parametrize(
    "preset,wrapped,unwrapped",
    [
        ("attention", {"attn1.to_q", "attn2.to_k", "attn1.to_out.0"}, {"ffn.net.2", "proj_out"}),
        ("attention+ffn", {"attn2.to_v", "ffn.net.0.proj", "ffn.net.2"}, {"proj_out", "linear_1"}),
    ],
)
def test_lora_target_presets(preset, wrapped, unwrapped, make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, f"model.lora.target_modules=[{preset}]")
    names = {n for n, m in module.transformer.named_modules() if hasattr(m, "lora_A")}
    assert all(any(n.endswith(w) for n in names) for w in wrapped)
    assert not any(n.endswith(u) for n in names for u in unwrapped)


def test_one_wan22_a14b_expert_trains_its_own_transformer_below_or_above_the_checkpoints_boundary(make_cfg, tmp_path):
    from diffusers import WanTransformer3DModel

    from tuner.config import ConfigError

    path = write_tiny("wan22-a14b", tmp_path / "tiny" / "wan22-a14b")
    for expert, sub in (("low_noise", "transformer_2"), ("high_noise", "transformer")):
        module = _module(make_cfg, tmp_path, f"model.expert={expert}", "model.finetune=full", variant="wan22-a14b")
        assert module.hparams.expert_boundary == 0.875  # the checkpoint's boundary_ratio
        own = WanTransformer3DModel.from_pretrained(path, subfolder=sub)
        for (name, p), q in zip(module.transformer.state_dict().items(), own.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
        levels = module.noise.sample(256, torch.Generator().manual_seed(0)) / 1000
        assert bool((levels < 0.875).all() if expert == "low_noise" else (levels >= 0.875).all())
    with pytest.raises(ConfigError, match="model.expert=high_noise"):  # an A14B run names its expert
        prepare(make_cfg("model=wan", f"model.pretrained_model_name_or_path={path}", output_dir=tmp_path / "x"))


def test_simpletuner_wan_imports_to_the_wan_presets(tmp_path):
    from tuner.interop.simpletuner import convert

    cases = (
        ("t2v-480p-1.3b-2.1", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan21-1.3b"),
        ("t2v-480p-14b-2.1", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan21-14b"),
        ("", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan21-1.3b"),
    )
    for flavour, repo, preset in cases:
        config = tmp_path / f"wan{flavour}.json"
        config.write_text(json.dumps({"model_family": "wan", "model_flavour": flavour, "model_type": "lora"}))
        res = convert(config)
        assert res.defaults["model"] == "wan" and res.defaults["preset"] == preset, flavour
        assert res.get("model.pretrained_model_name_or_path") == repo, flavour


def test_wan22_ti2v_resumes_exactly_validates_clips_and_fine_tunes_in_full(make_cfg, tmp_path):
    """The family matrix's checks on Wan 2.2 TI2V-5B's own layout (48-channel VAE at 1/16, timesteps per token)."""
    from diffusers import WanPipeline
    from safetensors.torch import load_file

    from tuner.config import ConfigError
    from tuner.run import train

    path = write_tiny("wan22-ti2v", tmp_path / "tiny" / "wan22-ti2v")
    common = ("model=wan", f"model.pretrained_model_name_or_path={path}", "data.bucket_step=32", "checkpointing_steps=2",
              "callbacks.validation.num_inference_steps=2")
    with pytest.raises(ConfigError, match="data.bucket_step=16: this wan checkpoint needs image edges divisible by 32"):
        prepare(make_cfg(*common, "data.bucket_step=16", output_dir=tmp_path / "x"))  # its VAE's 16x, before loading
    train(make_cfg(*common, "max_train_steps=4", output_dir=tmp_path / "straight"))
    train(make_cfg(*common, "max_train_steps=2", output_dir=tmp_path / "resumed"))
    train(make_cfg(*common, "max_train_steps=4", "resume_from_checkpoint=latest", output_dir=tmp_path / "resumed"))
    a, b = (load_file(tmp_path / run / "pytorch_lora_weights.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list((tmp_path / "straight" / "validation").rglob("*.mp4"))  # validation sampled clips
    train(make_cfg(*common, "model.finetune=full", "optimizer.lr=1e-3", "max_train_steps=2", output_dir=tmp_path / "full"))
    pipe = WanPipeline.from_pretrained(tmp_path / "full" / "pipeline")
    assert pipe.config.expand_timesteps and pipe.vae.config.z_dim == 48
    base = WanPipeline.from_pretrained(path).transformer.state_dict()
    assert any(not torch.equal(p, base[k]) for k, p in pipe.transformer.state_dict().items())
