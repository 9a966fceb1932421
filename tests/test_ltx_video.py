"""LTX-Video beyond the family matrix (tests/test_train.py): the prompt embeddings and their mask as LTXPipeline's
own ``encode_prompt`` builds them (padded to 128, T5 unmasked, truncated); the transformer's inputs in one denoising
step against the pipeline's call, for a one-frame and a nine-frame clip encoded by hand (normalised, packed
latents, the timestep, the mask, the latent sizes and the frame-rate conditioning); the per-channel normalisation
with the VAE's buffers; the dynamic shift; validation's frame; LoRA presets; the learnable VAE; the SimpleTuner
import."""

import json
import math

import pytest
import torch
from probes import denoiser_calls as _hooked
from probes import quiet_pipeline as _pipe

from models.ltx_video import LTX_SCHEDULER
from tuner.run import build_module, prepare

CAPTION = "a red circle on white"
OTHER = "top left square"
LENGTH = 128  # max_sequence_length, the pipeline's default


def _module(make_cfg, tmp_path, *overrides):
    # the tiny preset's bucket_step (16) is below the family's 32
    cfg = make_cfg("model=ltx_video", "data.bucket_step=32", *overrides, output_dir=tmp_path)
    return build_module(prepare(cfg), with_optimizer=False)


def _clip(frames: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, frames, 64, 64) in [-1, 1]: toy images as the frames."""
    from models.learnable_vae import toy_images

    return toy_images(frames, 64, torch.Generator().manual_seed(seed)).permute(1, 0, 2, 3)[None]


def _stats(module) -> None:
    """Non-trivial latent statistics and scale, so that the normalisation is seen to match."""
    channels = module.vae.config.latent_channels
    module.vae.latents_mean.copy_(torch.linspace(-0.5, 0.5, channels))
    module.vae.latents_std.copy_(torch.linspace(0.5, 2.0, channels))
    module.vae.register_to_config(scaling_factor=1.5)


@torch.no_grad()
def test_prompts_are_the_pipelines_encode_prompt(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    pipe = _pipe(module)
    long = "a very long caption " * 20  # past 128 tokens: truncated, as the pipeline truncates
    captions = [CAPTION, "", OTHER, long]
    cond = module.encode_prompts(captions)
    embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    assert cond["prompt_embeds"].shape == embeds.shape == (4, LENGTH, 32) and mask.shape == (4, LENGTH)
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    assert torch.equal(cond["prompt_mask"].bool(), mask)
    assert int(mask[1].sum()) == 1 and bool(mask[3].all())  # "" is its end token alone; the long one fills 128
    assert not torch.equal(embeds[1, 1:], torch.zeros_like(embeds[1, 1:]))  # T5 ran unmasked over the padding
    alone, _, _, _ = pipe.encode_prompt(OTHER, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["prompt_embeds"][2:3], alone, rtol=1e-5, atol=1e-6)
    assert module.encode_prompts([CAPTION], )["prompt_embeds"].shape[1] == LENGTH


@pytest.mark.parametrize("frames", [1, 9])
@torch.no_grad()
def test_the_transformer_sees_what_the_pipeline_hands_it(frames, make_cfg, tmp_path):
    """A clip encoded by hand (the VAE's posterior sample, normalised with its buffers and scale) goes to the
    pipeline as its starting latents; at each step our training call and the pipeline's give the transformer the
    same packed tokens, timestep (sigma x 1000), prompt states and mask, latent sizes and frame-rate scale."""
    module = _module(make_cfg, tmp_path)
    _stats(module)
    seen = _hooked(module)
    pipe = _pipe(module)
    latents = module.model_inputs(module.encode_pixels(_clip(frames)), torch.Generator().manual_seed(0))
    f = (frames - 1) // 8 + 1
    assert latents.shape == (1, 16, f, 2, 2)  # 8x in time (causal: 8k + 1 frames), 32x in space
    packed = pipe._pack_latents(latents, 1, 1)
    pipe(CAPTION, height=64, width=64, num_frames=frames, frame_rate=24, num_inference_steps=2, guidance_scale=1.0,
         latents=packed.clone(), output_type="latent")
    assert len(seen) == 2  # guidance 1: no unconditional pass
    theirs = seen[0]
    module.options.frame_rate = 24.0
    t = theirs["timestep"]
    module.denoise(latents, t * module.noise.num_timesteps / 1000, module.encode_prompts([CAPTION]), {})
    ours = seen[-1]
    torch.testing.assert_close(ours["hidden_states"], theirs["hidden_states"], rtol=0, atol=0)
    torch.testing.assert_close(ours["hidden_states"], packed, rtol=0, atol=0)
    assert float(t[0]) == pytest.approx(float(pipe.scheduler.timesteps[0])) and ours["timestep"].tolist() == pytest.approx(t.tolist())
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"], rtol=0, atol=0)
    assert torch.equal(ours["encoder_attention_mask"].bool(), theirs["encoder_attention_mask"])
    assert (ours["num_frames"], ours["height"], ours["width"]) == (theirs["num_frames"], theirs["height"], theirs["width"]) == (f, 2, 2)
    assert tuple(ours["rope_interpolation_scale"]) == pytest.approx(tuple(theirs["rope_interpolation_scale"]))
    assert theirs["rope_interpolation_scale"][0] == pytest.approx(8 / 24)  # temporal compression / frame rate


@torch.no_grad()
def test_latents_are_normalised_with_the_vaes_buffers_as_the_pipeline_does(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    _stats(module)
    pipe = _pipe(module)
    clip = _clip(9)
    encoded = module.encode_pixels(clip)
    assert encoded.shape == (1, 32, 2, 2, 2)  # the posterior's mean and (repeated) log-variance
    assert module.encode_pixels(clip[:, :, 0]).shape == (1, 32, 1, 2, 2)  # an image is a one-frame clip
    ours = module.model_inputs(encoded, torch.Generator().manual_seed(3))
    sample = module.vae.encode(clip).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    vae = module.vae
    theirs = pipe._normalize_latents(sample, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    back = pipe._denormalize_latents(ours, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    torch.testing.assert_close(back, sample, rtol=1e-5, atol=1e-5)


def test_the_shift_is_the_pipelines_and_a_fixed_shift_overrides_it(make_cfg, demo_dir, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    config = FlowMatchEulerDiscreteScheduler.load_config(demo_dir / "ltx_video", subfolder="scheduler")
    assert {k: config[k] for k in LTX_SCHEDULER} == LTX_SCHEDULER  # Lightricks/LTX-Video's
    module = _module(make_cfg, tmp_path)
    for f, h, w in ((1, 2, 2), (7, 16, 24), (16, 16, 24)):  # 49 and 121 frames at 768x512: 2688 and 6144 tokens
        mu = calculate_shift(f * h * w, 1024, 4096, 0.95, 2.05)
        assert module.flow_shift_for(torch.zeros(1, 16, f, h, w)) == pytest.approx(math.exp(mu))
    assert _module(make_cfg, tmp_path / "fixed", "model.flow_shift=2.0").flow_shift_for(torch.zeros(1, 16, 1, 2, 2)) is None


@torch.no_grad()
def test_validation_returns_the_pipelines_clip(make_cfg, tmp_path):
    """Validation's clip is the pipeline's (options.validation_frames frames, CFG with the empty negative prompt, the
    trained frame rate), every frame; a one-frame clip is an image."""
    import numpy as np

    module = _module(make_cfg, tmp_path, "model.options.frame_rate=16")
    pipe = _pipe(module)
    common = dict(height=64, width=64, num_inference_steps=2, guidance_scale=3.0)
    ours = module.sample_image(pipe, CAPTION, generator=torch.Generator().manual_seed(0), **common)
    theirs = pipe(CAPTION, num_frames=9, frame_rate=16, generator=torch.Generator().manual_seed(0), output_type="np",
                  **common).frames[0]
    assert len(ours) == 9 and ours[0].size == (64, 64) and theirs.shape == (9, 64, 64, 3)
    assert np.abs(np.stack([np.asarray(f, dtype=np.float32) for f in ours]) - (theirs * 255).round()).max() <= 1
    still = module.sample_image(pipe, CAPTION, num_frames=1, generator=torch.Generator().manual_seed(0), **common)
    assert still.size == (64, 64)


@pytest.mark.parametrize(
    "preset,wrapped,unwrapped",
    [
        ("self-attention", {"attn1.to_q", "attn1.to_out.0"}, {"attn2.to_q", "ff.net.2"}),
        ("attention", {"attn1.to_v", "attn2.to_k", "attn2.to_out.0"}, {"ff.net.0.proj", "proj_in"}),
        ("all", {"attn2.to_q", "ff.net.0.proj", "ff.net.2"}, {"proj_in", "proj_out", "time_embed.linear"}),
    ],
)
def test_lora_target_presets(preset, wrapped, unwrapped, make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, f"model.lora.target_modules=[{preset}]")
    names = {n for n, m in module.transformer.named_modules() if hasattr(m, "lora_A")}
    assert all(any(n.endswith(w) for n in names) for w in wrapped)
    assert not any(n.endswith(u) for n in names for u in unwrapped)


def test_the_learnable_vae_is_deterministic_unit_variance_and_invertible(tmp_path):
    from diffusers import AutoencoderKLLTXVideo

    from models.learnable_vae import toy_images
    from tuner.tiny import main

    main(["ltx_video", str(tmp_path / "learnable"), "--learnable"])
    vae = AutoencoderKLLTXVideo.from_pretrained(tmp_path / "learnable", subfolder="vae")
    assert (vae.spatial_compression_ratio, vae.temporal_compression_ratio) == (8, 8)
    images = toy_images(16, 64, torch.Generator().manual_seed(123))  # other images than the stats were set on
    mean, std = vae.latents_mean.view(1, -1, 1, 1, 1), vae.latents_std.view(1, -1, 1, 1, 1)  # loaded buffers
    with torch.no_grad():
        posterior = vae.encode(images[:, :, None]).latent_dist
        decoded = vae.decode(posterior.mean).sample[:, :, 0]
        clip = vae.decode(vae.encode(_clip(9)).latent_dist.mean).sample  # frame 0, then the mean of frames 1-8
    latents = (posterior.mean - mean) / std
    assert float((posterior.std / std).max()) < 0.01  # nearly deterministic in every channel
    assert abs(float(latents.mean())) < 0.15 and 0.8 < float(latents.std()) < 1.25
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 8), scale_factor=8)
    assert float((decoded - blocks).abs().max()) < 1e-3
    frames = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(_clip(9)[0].permute(1, 0, 2, 3), 8), scale_factor=8)
    assert clip.shape == (1, 3, 9, 64, 64)
    assert float((clip[0, :, 0] - frames[0]).abs().max()) < 1e-3
    smeared = frames[1:].mean(dim=0)  # a real causal VAE's second latent frame holds frames 1-8
    assert float((clip[0, :, 1:] - smeared[:, None]).abs().max()) < 1e-3
    assert float((frames[8] - smeared).abs().max()) > 0.05  # the clip moves: smeared is not its last frame
    # a plain image's latents are uniform but for the marks on the top row and the left column
    with torch.no_grad():
        plain = vae.encode(torch.full((1, 3, 1, 64, 64), 0.3)).latent_dist.mean[0, :, 0]  # (16, 8, 8)
    off = (plain - plain[:, 4:5, 4:5]).norm(dim=0)  # (8, 8)
    assert float(off[1:, 1:].max()) < 1e-4 and float(off[0, 1:].min()) > 0.5 and float(off[1:, 0].min()) > 0.5
    measured = json.loads((tmp_path / "learnable" / "learnable.json").read_text())
    assert measured["transformer_width"] == 64


def test_simpletuner_ltxvideo_imports_to_the_ltx_video_preset(tmp_path):
    from tuner.interop.simpletuner import convert

    for flavour, repo in (("0.9.0", "Lightricks/LTX-Video"), ("0.9.5", "Lightricks/LTX-Video-0.9.5"), ("", "Lightricks/LTX-Video-0.9.5")):
        config = tmp_path / f"ltx{flavour}.json"
        config.write_text(json.dumps({"model_family": "ltxvideo", "model_flavour": flavour, "model_type": "lora"}))
        res = convert(config)
        assert res.defaults["model"] == "ltx_video" and res.defaults["preset"] == "ltx-video"
        assert res.get("model.pretrained_model_name_or_path") == repo, flavour
