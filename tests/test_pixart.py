"""PixArt-Sigma beyond the family matrix (tests/test_train.py): T5 with its attention mask as the pipeline
encodes it, the learned-variance half left out of the loss, and the preset's full fine-tune."""

import torch

from tuner.run import build_module, prepare, train


def _module(make_cfg, tmp_path, *overrides):
    return build_module(prepare(make_cfg("model=pixart_sigma", *overrides, output_dir=tmp_path)), with_optimizer=False)


def test_prompts_are_t5_with_the_pipelines_mask(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    cond = module.encode_prompts(["a red circle on white", ""])
    assert cond["prompt_embeds"].shape == (2, 300, 32) and cond["attention_mask"].shape == (2, 300)
    n = len(module.tokenizer("a red circle on white").input_ids)  # its tokens and </s>; the rest is padding
    assert cond["attention_mask"][0].tolist() == [1.0] * n + [0.0] * (300 - n)
    pipe = module.pipeline()
    embeds, mask, _, _ = pipe.encode_prompt(
        "a red circle on white", do_classifier_free_guidance=False, clean_caption=False, max_sequence_length=300
    )
    assert torch.equal(mask[0].float(), cond["attention_mask"][0])
    torch.testing.assert_close(embeds[0], cond["prompt_embeds"][0], rtol=1e-5, atol=1e-6)


def test_the_loss_sees_the_prediction_half_of_the_learned_variance(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    assert module.transformer.config.out_channels == 8  # prediction + variance
    cond = module.encode_prompts(["x"])
    out = module.denoise(torch.randn(1, 4, 8, 8), torch.tensor([500]), cond, {})
    full = module.transformer(
        torch.randn(1, 4, 8, 8),
        encoder_hidden_states=cond["prompt_embeds"],
        encoder_attention_mask=cond["attention_mask"],
        timestep=torch.tensor([500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample
    assert out.shape == (1, 4, 8, 8) and full.shape == (1, 8, 8, 8)


def test_the_preset_fine_tunes_the_whole_transformer(make_cfg, demo_dir, tmp_path):
    from diffusers import PixArtSigmaPipeline

    out = tmp_path / "out"
    train(
        make_cfg(
            "preset=pixart-sigma",
            f"model.pretrained_model_name_or_path={demo_dir / 'pixart_sigma'}",
            f"data.path={demo_dir / 'images'}",
            "data.resolution=64",
            "data.bucket_step=16",
            "max_train_steps=2",
            "lr_scheduler.warmup_steps=1",
            "callbacks.validation.resolution=64",
            output_dir=out,
        )
    )
    pipe = PixArtSigmaPipeline.from_pretrained(out / "pipeline")
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, use_resolution_binning=False).images[0]
    assert image.size == (64, 64)
