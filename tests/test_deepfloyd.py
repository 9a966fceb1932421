"""DeepFloyd IF beyond the family matrix (tests/test_train.py): pixel space with no VAE and no image cache,
T5 with the pipeline's mask, the learned-variance half left out of the loss, and stage II's noised low-res
conditioning and validation."""

import torch
import torch.nn.functional as F
from PIL import Image

from tuner.run import build_module, prepare, train


def _module(make_cfg, tmp_path, family, *overrides):
    cfg = prepare(make_cfg(f"model={family}", *overrides, output_dir=tmp_path / "out"))
    return build_module(cfg, with_optimizer=False)


def test_prompts_are_t5_with_the_pipelines_mask(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, "deepfloyd_if")
    cond = module.encode_prompts(["a red circle on white"])
    assert cond["encoder_hidden_states"].shape == (1, 77, 32)
    embeds, _ = module.pipeline().encode_prompt(
        "a red circle on white", do_classifier_free_guidance=False, clean_caption=False
    )
    torch.testing.assert_close(embeds[0], cond["encoder_hidden_states"][0], rtol=1e-5, atol=1e-6)


def test_pixel_space_trains_on_pixels_and_caches_only_text(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, "deepfloyd_if")
    assert not hasattr(module, "vae") and module.data_encoders()["encode_pixels"] is None
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(module.encode_images(pixels), pixels)  # the denoiser's input is the image itself
    cache = tmp_path / "cache"
    train(
        make_cfg(
            "model=deepfloyd_if",
            f"data.cache_dir={cache}",
            "data.cache_latents=true",
            "data.cache_text_embeds=true",
            "max_train_steps=2",
            output_dir=tmp_path / "cached",
        )
    )
    assert not (cache / "latents").exists()  # nothing of the images is cached
    assert any((cache / "text_embeds").rglob("*.*"))


def test_the_loss_sees_the_prediction_half_of_the_learned_variance(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, "deepfloyd_if")
    assert module.unet.config.out_channels == 6  # prediction + variance
    cond = module.encode_prompts(["x"])
    noisy = torch.randn(1, 3, 32, 32)
    out = module.denoise(noisy, torch.tensor([500]), cond, {})
    full = module.unet(noisy, torch.tensor([500]), encoder_hidden_states=cond["encoder_hidden_states"]).sample
    assert out.shape == (1, 3, 32, 32) and full.shape == (1, 6, 32, 32)
    assert torch.equal(out, full[:, :3])


def test_stage_2_conditions_on_the_noised_low_res_target(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, "deepfloyd_if_sr", "model.options.low_res_noise_max=300")
    clean = torch.rand(4, 3, 64, 64) * 2 - 1
    cond = module.image_conditioning(clean, torch.Generator().manual_seed(0))
    levels = cond["noise_level"]
    assert levels.shape == (4,) and levels.dtype == torch.long and int(levels.max()) < 300
    # by hand: down 4x to 16 px, back up as the pipeline upsamples, noised by the checkpoint's noising schedule
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(torch.randint(0, 300, (4,), generator=generator), levels)
    low = F.interpolate(clean, (16, 16), mode="bilinear", antialias=True, align_corners=False)
    up = F.interpolate(low, (64, 64), mode="bilinear", align_corners=True)
    noise = torch.randn(up.shape, generator=generator)
    expected = module.image_noising_scheduler.add_noise(up, noise, levels)
    torch.testing.assert_close(cond["low_res"], expected)

    # the UNet sees the noisy image and the low-res one on channels, and the level as its class label
    seen = {}
    hook = module.unet.register_forward_pre_hook(lambda m, a, kw: seen.update(sample=a[0], **kw), with_kwargs=True)
    text = module.encode_prompts(["x"] * 4)
    out = module.denoise(torch.randn(4, 3, 64, 64), torch.tensor([10] * 4), {**text, **cond}, {})
    hook.remove()
    assert out.shape == (4, 3, 64, 64) and seen["sample"].shape == (4, 6, 64, 64)
    assert torch.equal(seen["sample"][:, 3:], cond["low_res"]) and torch.equal(seen["class_labels"], levels)


def test_stage_2_validation_upscales_stage_1_output_or_a_held_out_image(make_cfg, demo_dir, tmp_path):
    common = ("model=deepfloyd_if_sr", "max_train_steps=2", "callbacks.ema.enabled=false")
    # without stage I: a held-out image per prompt, downsampled
    train(make_cfg(*common, output_dir=tmp_path / "held_out"))
    # with stage I: its image for each prompt (the tiny stage I pipeline; it shares the run's T5)
    train(make_cfg(*common, f"model.options.stage_1={demo_dir / 'deepfloyd_if'}", output_dir=tmp_path / "chained"))
    for run in ("held_out", "chained"):
        images = sorted((tmp_path / run / "validation" / "step_2").glob("a_*.png"))
        assert len(images) == 2 and all(Image.open(p).size == (64, 64) for p in images)
    a = Image.open(tmp_path / "held_out" / "validation" / "step_2" / "a_red_circle_on_white.png")
    b = Image.open(tmp_path / "chained" / "validation" / "step_2" / "a_red_circle_on_white.png")
    assert a.tobytes() != b.tobytes()  # a different input to upscale


def test_stage_2_validation_gives_each_prompt_its_own_held_out_image(make_cfg, tmp_path):
    from types import SimpleNamespace

    from tuner.run import build_datamodule

    cfg = prepare(make_cfg("model=deepfloyd_if_sr", output_dir=tmp_path))
    module = build_module(cfg, with_optimizer=False)
    datamodule = build_datamodule(cfg, tmp_path)
    module._trainer = SimpleNamespace(datamodule=datamodule)  # what validation reads: the run's fixed batches
    held_out = [image for batch in datamodule.fixed_batches(4) for image in batch["pixels"]]
    assert len(held_out) >= 2
    lows = [module.low_res_image(prompt, (16, 16), {}) for prompt in ("first", "second", "first")]
    assert torch.equal(lows[0], lows[2])  # a prompt keeps its image from one validation to the next
    for low, image in zip(lows[:2], held_out[:2], strict=True):
        expected = F.interpolate(image[None].float(), (16, 16), mode="bilinear", antialias=True, align_corners=False)
        assert low.shape == (1, 3, 16, 16) and torch.equal(low, expected)
    assert not torch.equal(lows[0], lows[1])
