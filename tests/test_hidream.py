"""HiDream-I1 beyond the family matrix (tests/test_train.py): the four encoders' conditioning as
HiDreamImagePipeline's own ``encode_prompt`` builds it (pooled CLIPs, T5, every Llama layer); the transformer's
inputs in one denoising step against the pipeline's call, and the sign and patch layout of what it returns; real
CFG at validation, at the asked size; caption dropout; the shift from Full's UniPC scheduler; LoRA target presets;
the routers' load-balancing loss; Llama loaded from its own repo; the SimpleTuner import."""

import csv
import json
import shutil

import pytest
import torch
from probes import denoiser_calls as _hooked

from models.hidream import unpatchify
from tuner.run import build_module, prepare, train

CAPTION = "a red circle on white"
KEYS = ("pooled_prompt_embeds", "prompt_embeds_t5", "prompt_embeds_llama3")


def _module(make_cfg, tmp_path, *overrides):
    return build_module(prepare(make_cfg("model=hidream", *overrides, output_dir=tmp_path)), with_optimizer=False)


def _pipe(module, size: int = 64):
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.default_sample_size = size // pipe.vae_scale_factor  # the pipeline rescales to this area
    return pipe


def test_prompts_are_the_pipelines_encode_prompt(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    cond = module.encode_prompts([CAPTION, ""])
    # two CLIPs' pooled projections (32 + 48), T5 (128 tokens x 32), both Llama layers (128 tokens x 48), batch first
    assert cond["pooled_prompt_embeds"].shape == (2, 80) and cond["prompt_embeds_t5"].shape == (2, 128, 32)
    assert cond["prompt_embeds_llama3"].shape == (2, 2, 128, 48)
    t5, neg_t5, llama, neg_llama, pooled, neg_pooled = module.pipeline().encode_prompt(
        CAPTION, negative_prompt="", do_classifier_free_guidance=True, max_sequence_length=128
    )
    torch.testing.assert_close(cond["prompt_embeds_t5"], torch.cat([t5, neg_t5]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], torch.cat([pooled, neg_pooled]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        cond["prompt_embeds_llama3"], torch.cat([llama, neg_llama], dim=1).transpose(0, 1), rtol=1e-5, atol=1e-6
    )
    # Llama: the layers' outputs without the embeddings, run with the mask over a prompt padded with <|eot_id|>
    tokens = module.tokenizer_4([CAPTION], padding="max_length", max_length=128, return_tensors="pt")
    assert tokens.input_ids[0, 0] == module.tokenizer_4.bos_token_id
    assert tokens.input_ids[0, -1] == module.tokenizer_4.eos_token_id and tokens.attention_mask[0, -1] == 0
    states = module.text_encoder_4(
        tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
    ).hidden_states
    assert len(states) == 3 and torch.equal(cond["prompt_embeds_llama3"][0, 0], states[1][0])
    unmasked = module.text_encoder_4(tokens.input_ids, output_hidden_states=True).hidden_states
    assert not torch.allclose(unmasked[1][0], cond["prompt_embeds_llama3"][0, 0])  # the padding's states differ
    # T5 with its mask, as the pipeline runs it
    ids = module.tokenizer_3([CAPTION], padding="max_length", max_length=128, return_tensors="pt").input_ids
    assert not torch.allclose(module.text_encoder_3(ids)[0], cond["prompt_embeds_t5"][:1])


def test_the_transformer_sees_what_the_pipeline_hands_it(make_cfg, tmp_path):
    """One step of HiDreamImagePipeline and our training call give the transformer the same timestep (sigma x
    1000), text states and pooled vector, and leave the patches, ids and masks to it; the scheduler integrates
    exactly the negated output that training fits to noise - x0."""
    module = _module(make_cfg, tmp_path)
    module.eval()
    seen = _hooked(module)
    pipe = _pipe(module)
    stepped = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda out, t, x, **kw: stepped.append((out, x)) or step(out, t, x, **kw)
    pipe(CAPTION, height=64, width=64, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    assert len(seen) == 1  # guidance 1: no CFG pass
    theirs = seen[-1]
    sigma = float(pipe.scheduler.sigmas[0])  # 1 step, flow_shift 3: 0.99967
    assert theirs["timesteps"].tolist() == [int(sigma * 1000)]  # UniPC hands sigma x 1000, as an integer
    assert {"img_ids", "img_sizes", "hidden_states_masks"}.isdisjoint(theirs)  # square: no padding, no ids given
    noisy = stepped[0][1]
    pred = module.denoise(noisy, theirs["timesteps"].float(), module.encode_prompts([CAPTION]), {})
    ours = seen[-1]
    assert ours["timesteps"].tolist() == pytest.approx(theirs["timesteps"].tolist())
    assert set(ours) == set(theirs) - {"attention_kwargs"}  # (None there: no LoRA scale)
    for key in ("hidden_states", "encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6, msg=key)
    torch.testing.assert_close(pred, stepped[0][0], rtol=1e-5, atol=1e-6)  # what the scheduler steps with


@pytest.mark.parametrize("h,w", [(8, 8), (8, 12)])
def test_train_mode_patches_come_back_as_the_image_and_negated(make_cfg, tmp_path, h, w):
    """In train mode the transformer returns its patches (B, C, S, 4), a non-square image's padded to
    max_resolution's sequence; put back, they are the eval-mode image (MoE's two paths agree)."""
    module = _module(make_cfg, tmp_path)
    cond = module.encode_prompts([CAPTION, "a blue square"])
    noisy, t = torch.randn(2, 16, h, w), torch.tensor([300.0, 800.0])
    module.transformer.train()
    trained = module.denoise(noisy, t, cond, {})
    raw = module.transformer(
        noisy,
        t,
        cond["prompt_embeds_t5"],
        cond["prompt_embeds_llama3"].transpose(0, 1),
        cond["pooled_prompt_embeds"],
        return_dict=False,
    )[0]
    assert raw.shape == (2, 16, 16 if h == w else 64, 4)  # 64: max_resolution (16, 16) in 2x2 patches
    module.transformer.eval()
    evaluated = module.denoise(noisy, t, cond, {})
    torch.testing.assert_close(trained, evaluated, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unpatchify(raw, h, w), -evaluated, rtol=1e-5, atol=1e-5)


def test_validation_samples_with_real_cfg_on_the_negative_prompt_at_the_asked_size(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    seen = _hooked(module)
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = module.sample_image(
        pipe, CAPTION, negative_prompt="blurry", height=64, width=96, num_inference_steps=1, guidance_scale=4.0
    )
    assert image.size == (96, 64)  # not rescaled to the pipeline's 1024 x 1024 area
    assert len(seen) == 1 and seen[0]["hidden_states"].shape == (2, 16, 8, 12)  # negative, then the prompt
    negative = module.encode_prompts(["blurry"])
    torch.testing.assert_close(seen[0]["encoder_hidden_states_t5"][:1], negative["prompt_embeds_t5"])
    torch.testing.assert_close(seen[0]["pooled_embeds"][:1], negative["pooled_prompt_embeds"])


def test_a_dropped_caption_gets_the_empty_prompts_conditioning(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    cond = module.encode_prompts([CAPTION, "a blue square on white"])
    dropped = module.drop_cond(cond, [True, False])
    empty = module.encode_prompts([""])
    for key in KEYS:
        assert torch.equal(dropped[key][:1], empty[key]) and torch.equal(dropped[key][1:], cond[key][1:]), key


def test_the_shift_is_fulls_unipc_flow_shift_and_model_flow_shift_overrides_it(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path)
    assert type(module.pipeline().scheduler).__name__ == "UniPCMultistepScheduler"
    assert module.flow_shift_for(torch.zeros(1, 16, 8, 8)) == 3.0
    module.noise.config.pop("flow_shift")  # Dev/Fast: FlowMatchLCM's "shift", which the schedule reads itself
    assert module.flow_shift_for(torch.zeros(1, 16, 8, 8)) is None
    fixed = _module(make_cfg, tmp_path / "fixed", "model.flow_shift=2.0")
    assert fixed.flow_shift_for(torch.zeros(1, 16, 8, 8)) is None and fixed.noise.shift == 2.0


def test_lora_target_presets_leave_the_router_alone(make_cfg, tmp_path):
    def wrapped(module):
        return {n.split(".block.", 1)[-1] for n, m in module.transformer.named_modules() if hasattr(m, "lora_A")}

    attention = wrapped(_module(make_cfg, tmp_path / "a"))
    assert {"attn1.to_q", "attn1.to_out", "attn1.to_q_t", "attn1.to_out_t"} <= attention
    assert not any(".w1" in n for n in attention)
    every = wrapped(_module(make_cfg, tmp_path / "b", "model.lora.target_modules=[all]"))
    assert {"ff_i.experts.3.w1", "ff_i.shared_experts.w2", "ff_t.w3", "adaLN_modulation.1"} <= every
    assert not any("gate" in n for n in every)


def _batch():
    generator = torch.Generator().manual_seed(0)
    return {"pixels": torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1, "captions": [CAPTION, "a blue square"]}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_load_balancing_loss_moves_the_routers_gradients(make_cfg, tmp_path, checkpointing):
    grads, losses = {}, {}
    for weight in (0.0, 0.01):
        module = _module(
            make_cfg,
            tmp_path / str(weight),
            "model.finetune=full",
            f"model.options.aux_loss_weight={weight}",
            f"model.gradient_checkpointing={checkpointing}",
        )
        module.train()
        loss = module.compute_loss(_batch(), torch.Generator().manual_seed(0))
        loss.backward()
        gate = module.transformer.double_stream_blocks[0].block.ff_i.gate
        grads[weight], losses[weight] = gate.weight.grad.clone(), float(loss)
    assert losses[0.01] > losses[0.0]  # + 0.01 x the two MoE layers' balance terms (each >= 1)
    assert not torch.allclose(grads[0.0], grads[0.01])
    module.eval()  # validation's loss: the routers compute no balance term
    assert module.compute_loss(_batch(), torch.Generator().manual_seed(0), fixed_level=0.5).ndim == 0


def test_training_logs_the_routers_balance(make_cfg, tmp_path):
    train(
        make_cfg(
            "model=hidream",
            "max_train_steps=2",
            "checkpointing_steps=0",
            "callbacks.validation.enabled=false",
            output_dir=tmp_path,
        )
    )
    (metrics,) = tmp_path.glob("logs/*/metrics.csv")
    balance = [float(r["train/moe_balance"]) for r in csv.DictReader(metrics.open()) if r.get("train/moe_balance")]
    assert len(balance) == 2 and all(1.0 <= b <= 4.0 for b in balance)  # 1: balanced; 4 experts: at most 4


def test_llama_loads_from_its_own_repo_when_the_checkpoint_has_none(make_cfg, demo_dir, tmp_path):
    """HiDream's repos leave Llama out (model_index names none): it loads from model.options.llama_path, and a
    full export leaves it out again."""
    base, llama = tmp_path / "base", tmp_path / "llama"
    shutil.copytree(demo_dir / "hidream", base, ignore=shutil.ignore_patterns("text_encoder_4", "tokenizer_4"))
    index = json.loads((base / "model_index.json").read_text())
    index.update(text_encoder_4=[None, None], tokenizer_4=[None, None])
    (base / "model_index.json").write_text(json.dumps(index))
    shutil.copytree(demo_dir / "hidream" / "text_encoder_4", llama)
    shutil.copytree(demo_dir / "hidream" / "tokenizer_4", llama, dirs_exist_ok=True)
    module = _module(
        make_cfg, tmp_path / "out", f"model.pretrained_model_name_or_path={base}", f"model.options.llama_path={llama}"
    )
    reference = _module(make_cfg, tmp_path / "ref")
    assert module.tokenizer_4.pad_token == "<|eot_id|>"
    assert torch.equal(
        module.encode_prompts([CAPTION])["prompt_embeds_llama3"],
        reference.encode_prompts([CAPTION])["prompt_embeds_llama3"],
    )
    assert module.pipeline_load_overrides() == {"text_encoder_4": None, "tokenizer_4": None}
    assert reference.pipeline_load_overrides() == {}


def test_simpletuner_hidream_imports_to_the_hidream_preset(tmp_path):
    from tuner.interop.simpletuner import convert

    config = tmp_path / "hidream.json"
    config.write_text(
        json.dumps(
            {
                "model_family": "hidream",
                "model_flavour": "dev",
                "model_type": "lora",
                "lora_rank": 8,
                "hidream_use_load_balancing_loss": True,
                "hidream_load_balancing_loss_weight": 0.01,
            }
        )
    )
    res = convert(config)
    assert res.defaults["model"] == "hidream" and res.defaults["preset"] == "hidream"
    assert res.get("model.pretrained_model_name_or_path") == "HiDream-ai/HiDream-I1-Dev"
    # SimpleTuner's balancing loss is detached (it moves no gradient): not carried over as tuner's, which does
    unmapped = dict(res.unmapped)
    assert (
        "detached" in unmapped["hidream_use_load_balancing_loss"] and res.get("model.options.aux_loss_weight") is None
    )


def test_a_non_square_bucket_past_the_transformers_sequence_is_refused_by_name(make_cfg, tmp_path):
    """The transformer pads a non-square image to max_resolution's tokens (64 for the tiny one, 4096 for the real):
    a larger bucket is a clear error naming the key, and the preset's area buckets all fit the real 4096."""
    import numpy as np
    from conftest import compose_cfg

    from datamodules.buckets import MAX_ASPECT, bucket_for

    module = _module(make_cfg, tmp_path)
    cond = module.encode_prompts([CAPTION])
    assert module.denoise(torch.randn(1, 16, 8, 16), torch.tensor([500.0]), cond, {}).shape == (1, 16, 8, 16)  # 32
    with pytest.raises(
        ValueError, match=r"at most 64 tokens of a non-square image, this bucket has 72 .*data.resolution"
    ):
        module.denoise(torch.randn(1, 16, 16, 18), torch.tensor([500.0]), cond, {})
    data = compose_cfg(["preset=hidream"]).data
    tokens = {
        (w // 16) * (h // 16)
        for a in np.linspace(1 / MAX_ASPECT, MAX_ASPECT, 500)
        for w, h in [bucket_for(round(1000 * a), 1000, data.resolution, data.resolution_type.value, data.bucket_step)]
    }
    assert max(tokens) <= 4096
