"""What a model is trained on must be what it is sampled with: a prompt encoded as the family's pipeline
encodes it (IF and PixArt-Σ lowercase and strip it first), and the scheduler that validation, the exported
pipeline, the model card's snippet and the single-file checkpoint's marks give it."""

import pytest
import torch

from models.encoders import t5_with_mask
from tuner.families import write_tiny
from tuner.run import build_module, prepare

CAPTION = "A Photo of Zelda "
T5_FAMILIES = {"deepfloyd_if": "encoder_hidden_states", "deepfloyd_if_sr": "encoder_hidden_states", "pixart_sigma": "prompt_embeds"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The demo images, and each family's tiny pipeline written when a test first asks for it (not all of them)."""
    from datamodules.demo import write_images

    root = tmp_path_factory.mktemp("demo")
    write_images(root / "images")
    return root


def _cfg(make_cfg, demo_dir, tmp_path, family, *overrides):
    write_tiny(family, demo_dir / family)
    return prepare(make_cfg(f"model={family}", *overrides, output_dir=tmp_path / "out"))


def _module(make_cfg, demo_dir, tmp_path, family, *overrides):
    return build_module(_cfg(make_cfg, demo_dir, tmp_path, family, *overrides), with_optimizer=False)


def _pipeline_embeds(pipe, family, caption):
    if family == "pixart_sigma":
        embeds, mask, _, _ = pipe.encode_prompt(
            caption, do_classifier_free_guidance=False, clean_caption=False, max_sequence_length=300
        )
        return embeds, mask
    embeds, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, clean_caption=False)
    return embeds, None


# --- prompts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", T5_FAMILIES)
def test_training_encodes_a_caption_as_the_pipeline_does(family, make_cfg, demo_dir, tmp_path):
    module = _module(make_cfg, demo_dir, tmp_path, family)
    cond = module.encode_prompts([CAPTION])
    embeds, mask = _pipeline_embeds(module.pipeline(), family, CAPTION)
    torch.testing.assert_close(cond[T5_FAMILIES[family]], embeds, rtol=1e-5, atol=1e-6)
    if mask is not None:
        assert torch.equal(cond["attention_mask"], mask.float())
    # T5 is case-sensitive: the caption as written is other tokens than the lowercased one the pipeline sends
    raw, _ = t5_with_mask(module.tokenizer, module.text_encoder, [CAPTION], module.options.t5_max_length, module.device)
    assert not torch.allclose(raw, cond[T5_FAMILIES[family]])


@pytest.mark.parametrize("family", ["deepfloyd_if", "pixart_sigma"])
def test_the_text_cache_key_changes_with_the_prompt_preprocessing(family, make_cfg, demo_dir, tmp_path, monkeypatch):
    module = _module(make_cfg, demo_dir, tmp_path, family)
    key = module.data_encoders()["identity"]["text"]
    # an entry cached before the preprocessing (raw captions) must not be found under the new key
    monkeypatch.setattr(type(module), "prompt_preprocessing", "", raising=False)
    assert module.data_encoders()["identity"]["text"] != key


@pytest.mark.parametrize("family", ["deepfloyd_if", "pixart_sigma"])
def test_validation_does_not_clean_captions_training_did_not_clean(family, make_cfg, demo_dir, tmp_path):
    module = _module(make_cfg, demo_dir, tmp_path, family)
    pipe, seen = module.pipeline(), []
    pipe.set_progress_bar_config(disable=True)
    original = pipe._text_preprocessing

    def spy(text, clean_caption=False):
        seen.append(clean_caption)
        return original(text, clean_caption=clean_caption)

    pipe._text_preprocessing = spy
    generator = torch.Generator().manual_seed(0)
    module.sample_image(pipe, CAPTION, num_inference_steps=1, height=64, width=64, generator=generator)
    assert seen and not any(seen)
