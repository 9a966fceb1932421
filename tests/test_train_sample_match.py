"""What a model is trained on must be what it is sampled with: a prompt encoded as the family's pipeline
encodes it (IF and PixArt-Σ lowercase and strip it first), and the scheduler that validation, the exported
pipeline, the model card's snippet and the single-file checkpoint's marks give it."""

import json
from types import SimpleNamespace

import diffusers
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from callbacks.model_card import write_model_card
from models.encoders import t5_with_mask
from tuner.config.families import write_tiny
from tuner.export import single_file
from tuner.run import build_module, prepare
from tuner.runtime.lifecycle import card_info

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


# --- the sampling scheduler ------------------------------------------------------------------------------


def _card(cfg, tmp_path) -> str:
    return write_model_card(tmp_path / "card", card_info(cfg, None, {})).read_text()


def _scheduler_line(card: str) -> str | None:
    return next((line for line in card.splitlines() if line.startswith("pipe.scheduler = ")), None)


def _same_scheduler(a, b) -> None:
    assert type(a) is type(b)
    plain = {k: v for k, v in a.config.items() if not k.startswith("_")}
    assert json.dumps(plain, sort_keys=True, default=list) == json.dumps(
        {k: b.config[k] for k in plain}, sort_keys=True, default=list
    )


def _apply_card_line(card: str, base_dir):
    """The card's scheduler line run on a pipeline's scheduler as loaded from the base checkpoint."""
    base = diffusers.DDPMScheduler.load_config(base_dir, subfolder="scheduler")
    pipe = SimpleNamespace(scheduler=getattr(diffusers, base["_class_name"]).from_config(base))
    line = _scheduler_line(card)
    if line is not None:
        name = line.split("= ", 1)[1].split(".", 1)[0]
        imports = [n.strip() for i in card.splitlines() if i.startswith("from diffusers import ") for n in i[22:].split(",")]
        assert name in imports  # the snippet imports the class it names
        exec(line, vars(diffusers), {"pipe": pipe})  # noqa: S102 - the card's own line, as a user runs it
    return pipe.scheduler


@pytest.mark.parametrize("family", ["deepfloyd_if", "deepfloyd_if_sr"])
def test_if_samples_and_exports_with_the_variance_it_was_trained_for(family, make_cfg, demo_dir, tmp_path):
    module = _module(make_cfg, demo_dir, tmp_path, family, "model.finetune=full")
    assert module.pipeline().scheduler.config.variance_type == "fixed_small"  # validation's
    module.save_weights(tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert exported["_class_name"] == "DDPMScheduler" and exported["variance_type"] == "fixed_small"


def test_the_if_card_sets_the_fixed_variance_and_says_why(make_cfg, demo_dir, tmp_path):
    cfg = _cfg(make_cfg, demo_dir, tmp_path, "deepfloyd_if")
    card = _card(cfg, tmp_path)
    line = "pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type='fixed_small')"
    assert line in card.splitlines()
    notes = card.split("## Notes\n", 1)[1].split("\n## ", 1)[0]
    assert "fixed_small" in notes and "learned_range" in notes
    module = build_module(cfg, with_optimizer=False)
    _same_scheduler(_apply_card_line(card, cfg.model.pretrained_model_name_or_path), module.pipeline().scheduler)


V_PRED = ("model.prediction_type=v_prediction",)
ZTSNR = ("model.prediction_type=v_prediction", "model.zero_terminal_snr=true")


@pytest.mark.parametrize("overrides", [(), V_PRED, ZTSNR], ids=["epsilon", "v_prediction", "zero_terminal_snr"])
def test_a_lora_cards_snippet_samples_with_validations_scheduler(overrides, make_cfg, demo_dir, tmp_path):
    cfg = _cfg(make_cfg, demo_dir, tmp_path, "sd15", *overrides)
    card = _card(cfg, tmp_path)
    module = build_module(cfg, with_optimizer=False)
    validation = module.pipeline().scheduler
    _same_scheduler(_apply_card_line(card, cfg.model.pretrained_model_name_or_path), validation)
    assert (_scheduler_line(card) is None) == (not overrides)  # a base-model scheduler needs no line
    if overrides == ZTSNR:
        assert type(validation).__name__ == "DDIMScheduler" and validation.config.rescale_betas_zero_snr


@pytest.mark.parametrize("overrides", [V_PRED, ZTSNR], ids=["v_prediction", "zero_terminal_snr"])
def test_a_full_fine_tunes_pipeline_keeps_validations_scheduler(overrides, make_cfg, demo_dir, tmp_path):
    cfg = _cfg(make_cfg, demo_dir, tmp_path, "sd15", "model.finetune=full", *overrides)
    module = build_module(cfg, with_optimizer=False)
    module.save_weights(tmp_path / "export")
    exported = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "export" / "pipeline").scheduler
    _same_scheduler(exported, module.pipeline().scheduler)
    assert exported.config.prediction_type == "v_prediction"
    assert bool(exported.config.get("rescale_betas_zero_snr")) == (overrides == ZTSNR)
    assert _scheduler_line(_card(cfg, tmp_path)) is None  # the exported pipeline carries it: no line to add


# --- single-file marks -----------------------------------------------------------------------------------


def _marks(file) -> dict[str, int]:
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k).numel() for k in ("v_pred", "ztsnr") if k in f.keys()}


@pytest.mark.parametrize(
    "overrides, marks",
    [((), {}), (V_PRED, {"v_pred": 0}), (ZTSNR, {"v_pred": 0, "ztsnr": 0})],
    ids=["epsilon", "v_prediction", "zero_terminal_snr"],
)
def test_a_full_runs_single_file_marks_v_prediction_and_zero_terminal_snr(
    overrides, marks, make_cfg, demo_dir, tmp_path
):
    module = _module(make_cfg, demo_dir, tmp_path, "sd15", "model.finetune=full", *overrides)
    module.save_weights(tmp_path / "run")  # the run's export: run/pipeline/
    file = single_file(tmp_path / "run", tmp_path / "model.safetensors")
    assert _marks(file) == marks


def test_a_v_prediction_base_is_marked(demo_dir, tmp_path):
    file = single_file(write_tiny("sd2", demo_dir / "sd2"), tmp_path / "model.safetensors")
    assert _marks(file) == {"v_pred": 0}


def test_a_merged_lora_is_marked_as_its_run_trained(make_cfg, demo_dir, tmp_path):
    write_tiny("sd15", demo_dir / "sd15")
    composed = make_cfg("model=sd15", *ZTSNR, output_dir=tmp_path / "run")
    run = tmp_path / "run"
    build_module(prepare(composed), with_optimizer=False).save_weights(run)
    (run / ".hydra").mkdir()
    OmegaConf.save(composed, run / ".hydra" / "config.yaml")  # what a run records: the composed config, unresolved
    file = single_file(run, tmp_path / "model.safetensors", merge_lora=True)
    assert _marks(file) == {"v_pred": 0, "ztsnr": 0}
