"""FLUX.1 Kontext beyond the family matrix (tests/test_train.py): the prompt as FluxKontextPipeline's own
``encode_prompt`` gives it; the transformer's inputs in one denoising step (target tokens, then the clean reference's
tokens with ids whose first column is 1, over the reference's own size) against the pipeline's call; the prediction
of the target tokens alone; sampling at the asked size with the input image; LoRA targets; the SimpleTuner import."""

import json

import pytest
import torch
from PIL import Image
from probes import denoiser_calls as _hooked
from probes import quiet_pipeline as _pipe

from models import objectives as obj
from models.flux import pack, unpack
from models.flux_kontext import at_area, input_image
from tuner.run import build_module, prepare

CAPTION = "make the square red"


def _module(make_cfg, tmp_path, *overrides):
    return build_module(prepare(make_cfg("model=flux_kontext", *overrides, output_dir=tmp_path)), with_optimizer=False)


def test_prompts_are_the_pipelines_encode_prompt(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    cond = module.encode_prompts([CAPTION, ""])
    embeds, pooled, text_ids = _pipe(module).encode_prompt(CAPTION, prompt_2=None, max_sequence_length=512)
    torch.testing.assert_close(cond["prompt_embeds"][:1], embeds)
    torch.testing.assert_close(cond["pooled"][:1], pooled)
    assert cond["prompt_embeds"].shape == (2, 512, 32) and torch.equal(text_ids, torch.zeros(512, 3))


def test_the_transformer_sees_what_the_pipeline_hands_it(make_cfg, tmp_path):
    """At the same sigma, our training call and FluxKontextPipeline's denoising call give the transformer the same
    reference tokens (appended after the target's, never noised), ids (the reference's, over its own 96 x 64 size,
    first column 1), timestep (sigma in [0, 1], shifted by the target's tokens alone), guidance and prompt."""
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    pipe = _pipe(module)
    reference = input_image(64, 96)  # another aspect ratio than the 64 x 64 target: its own bucket
    pipe(
        image=reference,
        prompt=CAPTION,
        height=64,
        width=64,
        max_area=64 * 64,
        _auto_resize=False,
        num_inference_steps=1,
        guidance_scale=module.options.guidance,
        sigmas=[0.75],
        output_type="latent",
    )
    theirs = seen[-1]
    assert theirs["hidden_states"].shape == (1, 16 + 24, 64)  # 4 x 4 target tokens, then 4 x 6 reference tokens
    sigma = float(theirs["timestep"][0])
    assert sigma == pytest.approx(
        float(obj.shift_sigmas(torch.tensor(0.75), module.flow_shift_for(torch.zeros(1, 16, 8, 8))))
    )

    pixels = pipe.image_processor.preprocess(reference, 64, 96)  # (1, 3, 64, 96) in [-1, 1]
    noisy = torch.randn(1, 16, 8, 8)
    module.denoise(
        noisy, torch.tensor([sigma * 1000]), module.encode_prompts([CAPTION]), {"reference_pixels": [pixels]}
    )
    ours = seen[-1]
    for key in ("timestep", "guidance", "img_ids", "txt_ids"):
        assert torch.equal(ours[key], theirs[key].to(ours[key].dtype)), key
    assert ours["img_ids"][16:, 0].eq(1).all() and ours["img_ids"][:16, 0].eq(0).all()
    assert ours["img_ids"][16:, 1:].amax(0).tolist() == [3, 5]  # rows and columns of the reference's own grid
    torch.testing.assert_close(ours["hidden_states"][:, 16:], theirs["hidden_states"][:, 16:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["hidden_states"][:, :16], pack(noisy))
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
    torch.testing.assert_close(ours["pooled_projections"], theirs["pooled_projections"])


def test_the_prediction_is_the_target_tokens_alone(make_cfg, tmp_path):
    """Whatever the transformer says over the reference's tokens never reaches the prediction (nor the loss)."""
    module = _module(make_cfg, tmp_path)
    batch = {"reference_pixels": [torch.rand(2, 3, 64, 64) * 2 - 1]}
    noisy, t, cond = torch.randn(2, 16, 8, 8), torch.tensor([500.0, 700.0]), module.encode_prompts([CAPTION] * 2)
    outputs = []
    module.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    with torch.no_grad():
        pred = module.denoise(noisy, t, cond, batch)
    assert outputs[-1].shape == (2, 32, 64) and pred.shape == (2, 16, 8, 8)
    torch.testing.assert_close(pred, unpack(outputs[-1][:, :16], 8, 8))

    def spoil(m, a, out):
        out[0][:, 16:] = 1e6  # the reference tokens' output
        return out

    with torch.no_grad():
        handle = module.transformer.register_forward_hook(spoil)
        torch.testing.assert_close(module.denoise(noisy, t, cond, batch), pred)
        handle.remove()
        # ... while the reference itself conditions it
        other = {"reference_pixels": [torch.rand(2, 3, 64, 64) * 2 - 1]}
        assert not torch.allclose(module.denoise(noisy, t, cond, other), pred)


def test_validation_samples_at_the_asked_size_with_the_input(make_cfg, tmp_path):
    """The pipeline's 1 MP resizing is off: a 64 x 64 sample from a 128 x 80 input brought to the same area at its
    own aspect ratio (80 x 48: 5 x 3 tokens); the input changes the output; the embedding is the asked guidance."""
    module = _module(make_cfg, tmp_path)
    seen, outputs = _hooked(module), []
    module.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    pipe = _pipe(module)
    kwargs = dict(height=64, width=64, num_inference_steps=1, guidance_scale=2.5, negative_prompt="blurry")
    a = module.sample_image(
        pipe, CAPTION, image=input_image(80, 128), generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert a.size == (64, 64) and seen[-1]["hidden_states"].shape == (1, 16 + 15, 64)
    assert seen[-1]["guidance"].tolist() == [2.5] and len(seen) == 1  # no CFG pass on the negative prompt
    module.sample_image(
        pipe,
        CAPTION,
        image=[Image.new("RGB", (128, 80), (20, 200, 20))],
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    assert torch.equal(seen[0]["hidden_states"][:, :16], seen[1]["hidden_states"][:, :16])  # the same noise
    assert (outputs[0][:, :16] - outputs[1][:, :16]).abs().mean() > 1e-3  # another input, another prediction


def test_an_input_keeps_its_aspect_ratio_at_the_asked_area():
    assert at_area(input_image(80, 128), 64 * 64).size == (80, 48)
    assert at_area(input_image(1024, 1024), 512 * 512).size == (512, 512)
    square = input_image(64, 64)
    assert at_area(square, 64 * 64) is square


def test_lora_target_presets(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, "model.lora.target_modules=[all]")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in module.transformer.named_modules() if hasattr(m, "lora_A")}
    assert {"to_q", "add_q_proj", "to_add_out", "proj_mlp", "proj_out", "linear"} <= wrapped
    default = _module(make_cfg, tmp_path / "default")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in default.transformer.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}


@pytest.mark.parametrize(
    "given", [{"model_flavour": "kontext"}, {"pretrained_model_name_or_path": "black-forest-labs/FLUX.1-Kontext-dev"}]
)
def test_simpletuner_flux_kontext_imports_to_its_family_and_preset(tmp_path, given):
    from tuner.interop.simpletuner import convert

    config = tmp_path / "kontext.json"
    config.write_text(json.dumps({"model_family": "flux", "model_type": "lora", "lora_rank": 16, **given}))
    res = convert(config)
    assert res.defaults["model"] == "flux_kontext" and res.defaults["preset"] == "flux-kontext"
    assert res.get("model.pretrained_model_name_or_path") == "black-forest-labs/FLUX.1-Kontext-dev"


def test_the_card_says_how_to_sample_an_edit():
    from models.flux_kontext import FluxKontextModule

    (note,) = FluxKontextModule.card_notes(
        {"pretrained_model_name_or_path": "unused", "options": {"t5_max_length": 256}}
    )
    assert "`FluxKontextPipeline`" in note and "`image=`" in note and "max_sequence_length=256" in note
