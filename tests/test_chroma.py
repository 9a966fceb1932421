"""Chroma beyond the family matrix (tests/test_train.py): T5 with its attention mask and the transformer's
text mask, as ChromaPipeline's own ``encode_prompt`` builds them; the transformer's inputs in one denoising
step (timestep, ids, mask) against the pipeline's call; real CFG with the negative prompt at validation; the
dynamic shift; caption dropout's mask; the SimpleTuner import."""

import json
import math

import pytest
import torch
from probes import denoiser_calls as _hooked

from models import objectives as obj
from models.chroma import transformer_text_mask
from tuner.run import build_module, prepare

CAPTION = "a red circle on white"


def _module(make_cfg, tmp_path, *overrides):
    return build_module(prepare(make_cfg("model=chroma", *overrides, output_dir=tmp_path)), with_optimizer=False)


def test_prompts_are_the_pipelines_encode_prompt(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    cond = module.encode_prompts([CAPTION, ""])
    assert cond["prompt_embeds"].shape == (2, 512, 32) and cond["attention_mask"].shape == (2, 512)
    pipe = module.pipeline()
    embeds, text_ids, mask, neg_embeds, _, neg_mask = pipe.encode_prompt(
        CAPTION, negative_prompt="", do_classifier_free_guidance=True, max_sequence_length=512
    )
    torch.testing.assert_close(cond["prompt_embeds"][:1], embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond["prompt_embeds"][1:], neg_embeds, rtol=1e-5, atol=1e-6)
    assert torch.equal(cond["attention_mask"][:1], mask.float()) and torch.equal(cond["attention_mask"][1:], neg_mask.float())
    # every real token (</s> included) and the first padding token; the empty prompt keeps </s> and one pad
    n = len(module.tokenizer(CAPTION).input_ids)
    assert cond["attention_mask"][0].tolist() == [1.0] * (n + 1) + [0.0] * (512 - n - 1)
    assert cond["attention_mask"][1].tolist() == [1.0] * 2 + [0.0] * 510
    # T5 itself runs with the tokenizer's mask (unlike Flux): without it the hidden states differ
    tokens = module.tokenizer([CAPTION], padding="max_length", max_length=512, return_tensors="pt")
    unmasked = module.text_encoder(tokens.input_ids)[0]
    assert not torch.allclose(unmasked, cond["prompt_embeds"][:1])


def test_the_text_mask_keeps_real_tokens_and_the_first_pad():
    tokenizer_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert transformer_text_mask(tokenizer_mask).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_the_transformer_sees_what_the_pipeline_hands_it(make_cfg, tmp_path):
    """At the same sigma, our training call and ChromaPipeline's denoising call give the transformer the same
    timestep (sigma in [0, 1]), ids, attention mask (text mask + ones for the image tokens) and prompt."""
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe(CAPTION, height=64, width=64, num_inference_steps=1, guidance_scale=1.0, sigmas=[0.75], output_type="latent")
    assert len(seen) == 1  # guidance_scale 1: no CFG pass
    theirs = seen[-1]
    sigma = float(theirs["timestep"][0])  # 0.75, shifted by the scheduler for 16 image tokens
    assert sigma == pytest.approx(float(obj.shift_sigmas(torch.tensor(0.75), module.flow_shift_for(torch.zeros(1, 16, 8, 8)))))
    module.denoise(torch.randn(1, 16, 8, 8), torch.tensor([sigma * 1000]), module.encode_prompts([CAPTION]), {})
    ours = seen[-1]
    assert ours["timestep"].tolist() == pytest.approx([sigma])  # both hand the transformer sigma in [0, 1]
    for key in ("img_ids", "txt_ids", "attention_mask"):
        assert torch.equal(ours[key], theirs[key].to(ours[key].dtype)), key
    assert ours["attention_mask"].shape == (1, 512 + 16) and "guidance" not in ours and "pooled_projections" not in ours
    assert ours["hidden_states"].shape == theirs["hidden_states"].shape
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])


def test_validation_samples_with_real_cfg_on_the_negative_prompt(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = module.sample_image(
        pipe, CAPTION, negative_prompt="blurry", height=64, width=64, num_inference_steps=1, guidance_scale=4.0
    )
    assert image.size == (64, 64)
    assert len(seen) == 2  # the prompt, then the negative prompt
    negative = module.encode_prompts(["blurry"])
    torch.testing.assert_close(seen[1]["encoder_hidden_states"], negative["prompt_embeds"], rtol=1e-5, atol=1e-6)
    assert torch.equal(seen[1]["attention_mask"][:, :512], negative["attention_mask"])


def test_a_dropped_caption_gets_the_empty_prompts_embeddings_and_mask(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    cond = module.encode_prompts([CAPTION, "a blue square on white"])
    dropped = module.drop_cond(cond, [True, False])
    empty = module.encode_prompts([""])
    for key in ("prompt_embeds", "attention_mask"):
        assert torch.equal(dropped[key][:1], empty[key]) and torch.equal(dropped[key][1:], cond[key][1:]), key


def test_the_shift_is_the_pipelines_and_a_fixed_shift_overrides_it(make_cfg, tmp_path):
    from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift

    module = _module(make_cfg, tmp_path)
    for side in (8, 64, 128):
        mu = calculate_shift((side // 2) ** 2, 256, 4096, 0.5, 1.15)
        assert module.flow_shift_for(torch.zeros(1, 16, side, side)) == pytest.approx(math.exp(mu))
    assert _module(make_cfg, tmp_path / "fixed", "model.flow_shift=2.0").flow_shift_for(torch.zeros(1, 16, 8, 8)) is None


def test_lora_target_presets(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, "model.lora.target_modules=[all]")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in module.transformer.named_modules() if hasattr(m, "lora_A")}
    assert {"to_q", "add_q_proj", "to_add_out", "proj_mlp", "proj_out"} <= wrapped
    assert not any(n.startswith("distilled_guidance_layer") for n, m in module.transformer.named_modules() if hasattr(m, "lora_A"))


def test_simpletuner_chroma_imports_to_the_chroma_preset(tmp_path):
    from tuner.interop.simpletuner import convert

    config = tmp_path / "chroma.json"
    config.write_text(json.dumps({"model_family": "chroma", "model_flavour": "hd", "model_type": "lora", "lora_rank": 8}))
    res = convert(config)
    assert res.defaults["model"] == "chroma" and res.defaults["preset"] == "chroma"
    assert res.get("model.pretrained_model_name_or_path") == "lodestones/Chroma1-HD"
