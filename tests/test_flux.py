"""Flux beyond the family matrix (tests/test_train.py): packing, ids, the dev shift and the timestep the
transformer sees, each against FluxPipeline's own code; schnell; guidance; target presets; options."""

import math

import pytest
import torch

from models import objectives as obj
from models.flux import dynamic_mu, image_ids, pack, unpack
from tuner.run import build_module, prepare, train


def _module(make_cfg, tmp_path, *overrides):
    cfg = prepare(make_cfg("model=flux", *overrides, output_dir=tmp_path))
    return build_module(cfg, with_optimizer=False)


@pytest.mark.parametrize(("h", "w"), [(8, 8), (6, 10), (128, 96)])
def test_packing_round_trips_and_matches_the_pipeline(h, w):
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, h, w)
    tokens = pack(latents)
    assert tokens.shape == (2, (h // 2) * (w // 2), 64)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 2, 16, h, w))
    assert torch.equal(unpack(tokens, h, w), latents)
    assert torch.equal(unpack(tokens, h, w), FluxPipeline._unpack_latents(tokens, h * 8, w * 8, 8))
    assert torch.equal(image_ids(h, w, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32))


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096, 6000])
def test_the_dev_shift_is_the_pipelines(seq_len):
    """mu from the sequence length as FluxPipeline computes it, and the shifted sigma as its scheduler does."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    mu = dynamic_mu(seq_len, config)
    assert mu == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    ours = obj.shift_sigmas(sigmas, math.exp(mu))
    theirs = scheduler.time_shift(mu, 1.0, sigmas)
    assert torch.allclose(ours, theirs.float(), atol=1e-6)


def test_the_transformer_sees_what_the_pipeline_hands_it(make_cfg, tmp_path):
    """At the same sigma, our training call and FluxPipeline's denoising call give the transformer the same
    timestep (sigma in [0, 1]), guidance, ids and token layout."""
    module = _module(make_cfg, tmp_path)
    seen = []
    module.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe("a red circle", height=64, width=64, num_inference_steps=1, guidance_scale=1.0, sigmas=[0.75], output_type="latent")
    theirs = seen[-1]
    sigma = float(theirs["timestep"][0])  # sigma 0.75, shifted by the dev scheduler for 16 image tokens
    assert sigma == pytest.approx(float(obj.shift_sigmas(torch.tensor(0.75), module.flow_shift_for(torch.zeros(1, 16, 8, 8)))))
    cond = module.encode_prompts(["a red circle"])
    module.denoise(torch.randn(1, 16, 8, 8), torch.tensor([sigma * 1000]), cond, {})  # our timesteps are sigma x 1000
    ours = seen[-1]
    assert ours["timestep"].tolist() == pytest.approx([sigma])  # both hand the transformer sigma in [0, 1]
    assert ours["guidance"].tolist() == theirs["guidance"].tolist() == [1.0]
    for key in ("img_ids", "txt_ids"):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["hidden_states"].shape == theirs["hidden_states"].shape
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])


def test_dev_shifts_by_resolution_and_a_fixed_shift_overrides_it(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    small, large = module.flow_shift_for(torch.zeros(1, 16, 8, 8)), module.flow_shift_for(torch.zeros(1, 16, 128, 128))
    assert small == pytest.approx(math.exp(dynamic_mu(16, module.noise.config)))
    assert large == pytest.approx(math.exp(1.15))  # 4096 tokens: the max shift
    assert _module(make_cfg, tmp_path / "fixed", "model.flow_shift=2.0").flow_shift_for(torch.zeros(1, 16, 8, 8)) is None


def test_schnell_has_no_guidance_and_a_fixed_shift(make_cfg, demo_dir, tmp_path):
    from tuner.config.families import write_tiny

    path = write_tiny("flux-schnell", tmp_path / "schnell")
    module = _module(make_cfg, tmp_path, f"model.pretrained_model_name_or_path={path}", "model.options.t5_max_length=256")
    assert not module.transformer.config.guidance_embeds
    assert module.flow_shift_for(torch.zeros(1, 16, 64, 64)) is None and module.noise.shift == 1.0
    seen = []
    module.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    module.denoise(torch.randn(1, 16, 8, 8), torch.tensor([500.0]), module.encode_prompts(["x"]), {})
    assert seen[0]["guidance"] is None and seen[0]["encoder_hidden_states"].shape[1] == 256
    out = tmp_path / "run"
    train(make_cfg("preset=flux-schnell", f"model.pretrained_model_name_or_path={path}", f"data.path={demo_dir / 'images'}",
                   "model.options.training_adapter=null",  # the preset's is on the Hub (test_flux_schnell: a local one)
                   "data.resolution=64", "data.bucket_step=16", "max_train_steps=2", "lr_scheduler.warmup_steps=1",
                   "callbacks.validation.resolution=64", output_dir=out))  # fmt: skip
    assert "license: apache-2.0" in (out / "README.md").read_text()


def test_lora_target_presets(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, "model.lora.target_modules=[attention+ffn]")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in module.transformer.named_modules() if hasattr(m, "lora_A")}
    assert {"to_q", "add_q_proj", "proj_mlp", "proj_out"} <= wrapped
    assert module.run_identity()["lora_target_modules"] == sorted(module.lora_target_presets["attention+ffn"])
    plain = _module(make_cfg, tmp_path / "plain")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in plain.transformer.named_modules() if hasattr(m, "lora_A")}
    assert "proj_mlp" not in wrapped and {"to_q", "to_k", "to_v", "add_k_proj", "to_add_out"} <= wrapped
