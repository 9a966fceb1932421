"""Kolors beyond the family matrix (tests/test_train.py): ChatGLM's prompt embeddings as KolorsPipeline
makes them, SDXL's time ids, and the 1100-step schedule taken from the checkpoint."""

import pytest
import torch

from tuner.run import build_module, prepare


@pytest.fixture
def module(make_cfg, tmp_path):
    return build_module(prepare(make_cfg("model=kolors", output_dir=tmp_path)), with_optimizer=False)


def test_prompt_embeddings_are_the_pipelines_own(module):
    cond = module.encode_prompts(["a red circle on white", ""])
    assert cond["prompt_embeds"].shape == (2, 256, 32) and cond["pooled"].shape == (2, 32)
    pipe = module.pipeline()
    for row, prompt in enumerate(["a red circle on white", ""]):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        torch.testing.assert_close(embeds[0], cond["prompt_embeds"][row], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pooled[0], cond["pooled"][row], rtol=1e-5, atol=1e-6)


def test_the_schedule_is_the_checkpoints_1100_steps(module):
    assert module.noise.num_timesteps == 1100 and module.noise.max_t == 1100
    assert module.noise.at_level(0.5, 1).tolist() == [550]
    t = module.noise.sample(2000, torch.Generator().manual_seed(0))
    assert int(t.max()) > 1000  # the last hundred timesteps are trained too


def test_sdxl_time_ids_reach_the_unet(module):
    seen = {}
    module.unet.register_forward_pre_hook(lambda m, a, kw: seen.update(kw["added_cond_kwargs"]), with_kwargs=True)
    batch = {
        "original_size": torch.tensor([[70, 100]]),
        "crop_top_left": torch.tensor([[4, 0]]),
        "target_size": torch.tensor([[48, 80]]),
    }
    module.denoise(torch.randn(1, 4, 6, 10), torch.tensor([500]), module.encode_prompts(["x"]), batch)
    assert seen["time_ids"].tolist() == [[70.0, 100.0, 4.0, 0.0, 48.0, 80.0]] and seen["text_embeds"].shape == (1, 32)


def test_sentencepiece_is_declared_and_installable_as_the_kolors_extra():
    import tomllib
    from conftest import ROOT

    from models.kolors import KolorsModule

    assert KolorsModule.requires == {"sentencepiece": "kolors"}  # checked before load: tuner.config.families
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("sentencepiece") for dep in extras["kolors"]) and "kolors" in extras["all"][0]
