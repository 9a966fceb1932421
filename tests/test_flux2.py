"""FLUX.2 beyond the family matrix (tests/test_train.py, which runs the klein base): prompt embeddings against each
pipeline's own ``encode_prompt`` (chat template, system message, stacked hidden layers); the batch-norm latent
normalisation against the pipelines' un-normalisation; the transformer's inputs in one denoising step (timestep,
4-D ids, guidance) against each pipeline's call; validation sampling (klein's real CFG on the empty prompt, a
distilled klein without it, dev's guidance embedding); caption dropout; the shift; LoRA targets; the variant and
licence read from the checkpoint; dev trained end to end; the SimpleTuner import."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import generate
from probes import denoiser_calls as _hooked

from models import flux2
from models import objectives as obj
from tuner.run import build_module, prepare, train

CAPTION = "a red circle on white"


@pytest.fixture(scope="session")
def dev_dir(tmp_path_factory):
    from tuner.config.families import write_tiny

    return write_tiny("flux2-dev", tmp_path_factory.mktemp("flux2") / "dev")


def _module(make_cfg, tmp_path, *overrides):
    return build_module(prepare(make_cfg("model=flux2", *overrides, output_dir=tmp_path)), with_optimizer=False)


def _dev(make_cfg, tmp_path, dev_dir, *overrides):
    return _module(make_cfg, tmp_path, f"model.pretrained_model_name_or_path={dev_dir}", *overrides)


def test_klein_prompts_are_the_pipelines_encode_prompt(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    assert type(module.pipeline()).__name__ == "Flux2KleinPipeline" and module.text_layers() == (9, 18, 27)
    cond = module.encode_prompts([CAPTION, ""])
    assert cond["prompt_embeds"].shape == (2, 512, 48)  # 3 layers x 16 wide, every padding token kept
    pipe = module.pipeline()
    for row, prompt in enumerate((CAPTION, "")):
        embeds, text_ids = pipe.encode_prompt(prompt, device="cpu")
        torch.testing.assert_close(cond["prompt_embeds"][row : row + 1], embeds, rtol=0, atol=0)
        assert text_ids[0].tolist() == [[0, 0, 0, i] for i in range(512)]
    # Qwen3's chat template with thinking off, and layers 9, 18, 27 side by side for each token
    text = module.tokenizer.apply_chat_template([{"role": "user", "content": CAPTION}], tokenize=False,
                                                add_generation_prompt=True, enable_thinking=False)
    assert text.endswith("<think>\n\n</think>\n\n") and CAPTION in text
    tokens = module.tokenizer([text], padding="max_length", max_length=512, return_tensors="pt")
    hidden = module.text_encoder(**tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cond["prompt_embeds"][0, :, 16:32], hidden[18][0])


def test_dev_prompts_are_the_pipelines_encode_prompt(make_cfg, tmp_path, dev_dir):
    module = _dev(make_cfg, tmp_path, dev_dir)
    assert type(module.pipeline()).__name__ == "Flux2Pipeline" and module.text_layers() == (10, 20, 30)
    cond = module.encode_prompts([CAPTION])
    embeds, _ = module.pipeline().encode_prompt(CAPTION, device="cpu")
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    # the system message comes first, in Mistral's format
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    ids = module.tokenizer.apply_chat_template(flux2_messages(CAPTION, SYSTEM_MESSAGE), tokenize=True, return_dict=True)
    text = module.tokenizer.decode(ids["input_ids"])
    assert text == f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{CAPTION}[/INST]"


def flux2_messages(prompt: str, system: str) -> list[dict]:
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    return format_input([prompt], system_message=system)[0]


def test_latents_are_normalised_as_the_pipeline_un_normalises_them(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    mean = torch.randn(2, 8, 8, 12)  # the VAE's own latents (B, 8, H/8, W/8)
    encoded = torch.cat([mean, torch.full_like(mean, -60.0)], dim=1)  # a posterior of std ~1e-13
    latents = module.model_inputs(encoded, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 32, 4, 6)
    # Flux2KleinPipeline's last steps before decoding, verbatim in effect: un-normalise, unpatchify
    pipe, vae = module.pipeline(), module.vae
    bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    assert not torch.allclose(bn_std, torch.ones_like(bn_std))  # the tiny VAE's statistics are not the identity
    torch.testing.assert_close(pipe._unpatchify_latents(latents * bn_std + bn_mean), mean)
    torch.testing.assert_close(flux2.patchify(mean), pipe._patchify_latents(mean), rtol=0, atol=0)


def test_the_learnable_vae_normalises_to_unit_variance_and_inverts(tmp_path):
    """``--learnable``: an AutoencoderKLFlux2 (models/learnable_vae_flux2.py) whose latents, normalised by its
    batch-norm statistics as the pipelines do, have unit variance on images, and whose decoder gives them back."""
    from diffusers import AutoencoderKLFlux2

    from models.learnable_vae import toy_images
    from tuner.config.families import write_tiny

    path = write_tiny("flux2", tmp_path / "learnable", learnable=True)
    vae = AutoencoderKLFlux2.from_pretrained(path, subfolder="vae")
    images = toy_images(32, 64, torch.Generator().manual_seed(123))  # other images than the statistics' own
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        mean, std = flux2.bn_stats(vae, posterior.mean)
        latents = (flux2.patchify(posterior.mean) - mean) / std  # what training sees
        decoded = vae.decode(flux2.unpatchify(latents * std + mean)).sample  # as the pipelines decode
    assert float(posterior.std.max() / std.min()) < 0.01  # nearly deterministic against the latents' spread
    assert abs(float(latents.mean())) < 0.15 and 0.8 < float(latents.std()) < 1.25
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 8), scale_factor=8)
    assert float((decoded - blocks).abs().max()) < 0.02
    assert json.loads((path / "learnable.json").read_text())["transformer_width"] >= 2 * 32  # widened past its patch


def test_the_learnable_dev_text_encoder_carries_the_caption_past_the_system_message():
    """FLUX.2 [dev]'s prompt follows a ~180-token system message; the learnable tiny Mistral's sharper attention
    (models/learnable.SHARPER_ATTENTION) carries the caption into the tokens after it, as klein's Qwen3 does
    without one: at the decoder LMs' common scale the dev fine-tune ignored its prompt."""
    from models.learnable import sharpen_text_encoders
    from models.tiny_flux2 import tiny_flux2

    pipe = tiny_flux2(dev=True)
    sharpen_text_encoders(pipe)
    with torch.no_grad():
        embeds = torch.cat([pipe.encode_prompt(p, device="cpu")[0] for p in ("top left square", "top right square")])
    differs = (embeds[0] - embeds[1]).abs().mean(-1)  # (512,)
    first = int((differs > 1e-4).nonzero()[0])  # the caption's first differing token, after the system message
    assert first > 150 and float(differs[first + 20 :].mean()) > 0.2  # 0.03 at the common scale


def test_the_klein_transformer_sees_what_the_pipeline_hands_it(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt=CAPTION, height=64, width=96, num_inference_steps=1, guidance_scale=1.0, sigmas=[0.75],
         output_type="latent")
    assert len(seen) == 1  # guidance_scale 1: no CFG pass
    theirs = seen[-1]
    sigma = float(theirs["timestep"][0])  # 0.75, shifted by the scheduler with Flux.2's mu for 4x6 tokens, 1 step
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    assert sigma == pytest.approx(float(obj.shift_sigmas(torch.tensor(0.75), math.exp(compute_empirical_mu(24, 1)))))
    noisy = torch.randn(1, 32, 4, 6)
    module.denoise(noisy, torch.tensor([sigma * 1000]), module.encode_prompts([CAPTION]), {})
    ours = seen[-1]
    assert ours["timestep"].tolist() == pytest.approx([sigma])  # both hand the transformer sigma in [0, 1]
    assert ours["guidance"] is None and theirs["guidance"] is None
    for key in ("img_ids", "txt_ids"):  # (0, row, column, 0) image ids and (0, 0, 0, index) text ids
        assert torch.equal(ours[key], theirs[key][0]), key
    assert ours["img_ids"][:7].tolist() == [[0, 0, c, 0] for c in range(6)] + [[0, 1, 0, 0]]
    torch.testing.assert_close(ours["hidden_states"], pipe._pack_latents(noisy), rtol=0, atol=0)
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"], rtol=0, atol=0)


def test_the_dev_transformer_gets_its_guidance_embedding(make_cfg, tmp_path, dev_dir):
    module = _dev(make_cfg, tmp_path, dev_dir, "model.options.guidance=1.5")
    seen = _hooked(module)
    module.denoise(torch.randn(2, 32, 4, 4), torch.tensor([500.0, 250.0]), module.encode_prompts([CAPTION, ""]), {})
    assert seen[0]["guidance"].tolist() == [1.5, 1.5] and seen[0]["guidance"].dtype == torch.float32
    assert seen[0]["timestep"].tolist() == [0.5, 0.25]
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = module.sample_image(pipe, CAPTION, negative_prompt="blurry", height=64, width=64, num_inference_steps=1,
                                guidance_scale=3.0)
    assert image.size == (64, 64) and len(seen) == 2  # one call: no CFG, the negative prompt dropped
    assert seen[1]["guidance"].tolist() == [3.0]  # validation's scale goes into the embedding
    for key in ("img_ids", "txt_ids"):  # the pipeline's (1, N, 4) ids are the training call's (N, 4)
        assert torch.equal(seen[1][key][0], seen[0][key]), key


def test_klein_base_validates_with_real_cfg_against_the_empty_prompt(make_cfg, tmp_path, caplog):
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    for _ in range(2):
        image = module.sample_image(pipe, CAPTION, negative_prompt="blurry", height=64, width=64,
                                    num_inference_steps=1, guidance_scale=4.0)  # fmt: skip
    assert image.size == (64, 64) and len(seen) == 4  # each time the prompt, then the unconditional pass
    torch.testing.assert_close(seen[1]["encoder_hidden_states"], module.encode_prompts([""])["prompt_embeds"])
    # the configured negative prompt cannot be used, and the run says so once
    assert sum("take no negative prompt" in r.getMessage() for r in caplog.records) == 1


def test_a_distilled_klein_samples_without_cfg(make_cfg, tmp_path):
    from tuner.config.families import write_tiny

    path = write_tiny("flux2-klein", tmp_path / "distilled")
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))  # as FLUX.2-klein-4B's says
    module = _module(make_cfg, tmp_path, f"model.pretrained_model_name_or_path={path}")
    assert module.variant.distilled and module.pipeline().config.is_distilled
    seen = _hooked(module)
    module.sample_image(module.pipeline(), CAPTION, height=64, width=64, num_inference_steps=1, guidance_scale=4.0)
    assert len(seen) == 1
    assert "un-distill" in " ".join(flux2.Flux2Module.card_notes(_cfg(path)))


def _cfg(path) -> dict:
    return {"pretrained_model_name_or_path": str(path), "options": {}}


def test_a_dropped_caption_gets_the_empty_prompts_embeddings(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    cond = module.encode_prompts([CAPTION, "a blue square on white"])
    dropped = module.drop_cond(cond, [True, False])
    empty = module.encode_prompts([""])["prompt_embeds"]
    assert torch.equal(dropped["prompt_embeds"][:1], empty)
    assert torch.equal(dropped["prompt_embeds"][1:], cond["prompt_embeds"][1:])


def test_the_shift_is_the_pipelines_empirical_mu_and_a_fixed_shift_overrides_it(make_cfg, tmp_path):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    module = _module(make_cfg, tmp_path)
    for side, steps in ((4, 50), (64, 50), (96, 50)):  # patchified latents: 1024 px is 64x64 tokens
        expected = math.exp(compute_empirical_mu(side * side, steps))
        assert module.flow_shift_for(torch.zeros(1, 32, side, side)) == pytest.approx(expected)
    assert module.flow_shift_for(torch.zeros(1, 32, 64, 64)) == pytest.approx(7.5636, rel=1e-4)  # 1024 px, 50 steps
    few = _module(make_cfg, tmp_path / "few", "model.options.shift_steps=4")
    assert few.flow_shift_for(torch.zeros(1, 32, 64, 64)) == pytest.approx(math.exp(compute_empirical_mu(4096, 4)))
    fixed = _module(make_cfg, tmp_path / "fixed", "model.flow_shift=2.0")
    assert fixed.flow_shift_for(torch.zeros(1, 32, 8, 8)) is None


def test_lora_target_presets(make_cfg, tmp_path):
    def wrapped(module) -> set[str]:
        return {n for n, m in module.transformer.named_modules() if hasattr(m, "lora_A")}

    plain = wrapped(_module(make_cfg, tmp_path))
    double = {f"transformer_blocks.0.attn.{name}" for name in ("to_q", "add_v_proj", "to_add_out", "to_out.0")}
    assert double | {"single_transformer_blocks.0.attn.to_qkv_mlp_proj"} <= plain
    assert not any(".ff." in n or n.endswith("attn.to_out") for n in plain)
    every = wrapped(_module(make_cfg, tmp_path / "all", "model.lora.target_modules=[all]"))
    assert {"single_transformer_blocks.0.attn.to_out", "transformer_blocks.0.ff.linear_in",
            "transformer_blocks.0.ff_context.linear_out", "double_stream_modulation_img.linear",
            "single_stream_modulation.linear"} <= every
    assert "transformer_blocks.0.attn.to_out" not in every  # the double blocks' ModuleList is not a target


def test_the_card_names_the_checkpoints_weights_pipeline_and_licence(dev_dir, tmp_path):
    for dim, spdx in ((7680, "apache-2.0"), (12288, "other"), (15360, "other")):
        config = json.loads((dev_dir / "transformer" / "config.json").read_text())
        folder = tmp_path / str(dim)
        (folder / "transformer").mkdir(parents=True)
        (folder / "transformer" / "config.json").write_text(json.dumps({**config, "joint_attention_dim": dim}))
        (folder / "model_index.json").write_text((dev_dir / "model_index.json").read_text())
        card = flux2.Flux2Module.checkpoint_card(_cfg(folder))
        assert card == {"pipeline": "Flux2Pipeline", "license": spdx}
        assert flux2.WEIGHTS[dim][0] in flux2.Flux2Module.card_notes(_cfg(folder))[0]
    # the tiny checkpoint is none of the public ones: the family's licence, and the pipeline it is
    assert flux2.Flux2Module.checkpoint_card(_cfg(dev_dir)) == {"pipeline": "Flux2Pipeline"}
    # a Hub id that cannot be read offline is told by its name
    variant, weights = flux2.checkpoint_of(_cfg("black-forest-labs/FLUX.2-klein-base-9B"))
    assert not variant.dev and not variant.distilled and weights[1] == "other"


def test_dev_trains_exports_a_lora_its_pipeline_loads_and_a_card_for_dev(make_cfg, demo_dir, dev_dir, tmp_path):
    """The family matrix trains the klein base; dev's own path end to end: LoRA training with validation, the
    export through Flux2Pipeline's loader, the card's pipeline and notes."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    loss = train(make_cfg("model=flux2", f"model.pretrained_model_name_or_path={dev_dir}", "optimizer.lr=5e-2",
                          "callbacks.validation.num_inference_steps=2", output_dir=out))  # fmt: skip
    assert np.isfinite(loss) and list((out / "validation").glob("step_*/*.png"))
    pipe = DiffusionPipeline.from_pretrained(dev_dir)
    before = generate(pipe)
    flux2.Flux2Module.load_lora(pipe, out)
    assert np.abs(generate(pipe) - before).mean() > 1e-3
    card = (out / "README.md").read_text()
    assert "from diffusers import Flux2Pipeline" in card and "guidance-distilled" in card
    assert "image = pipe(prompt=" in card  # by name: the pipeline's first argument is a reference image


def test_simpletuner_flux2_imports_to_its_presets(tmp_path):
    from tuner.interop.simpletuner import convert

    for flavour, preset, path in (
        ("dev", "flux2-dev", "black-forest-labs/FLUX.2-dev"),
        ("klein-4b", "flux2-klein", "black-forest-labs/FLUX.2-klein-base-4B"),
        ("klein-9b", "flux2-klein", "black-forest-labs/FLUX.2-klein-base-9B"),
    ):
        config = tmp_path / f"{flavour}.json"
        config.write_text(json.dumps({"model_family": "flux2", "model_flavour": flavour, "model_type": "lora"}))
        res = convert(config)
        assert res.defaults["model"] == "flux2" and res.defaults["preset"] == preset, flavour
        assert res.get("model.pretrained_model_name_or_path") == path
