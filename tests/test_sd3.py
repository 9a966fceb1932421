"""SD3 / SD3.5 beyond the family matrix (tests/test_train.py): its prompt layout matches the pipeline's
own, it trains without T5, on a quantised transformer, and its options are checked before loading."""

import math

import pytest
import torch

from tuner.config import ConfigError
from tuner.run import build_module, prepare, train


def _module(make_cfg, tmp_path, *overrides):
    cfg = prepare(make_cfg("model=sd3", *overrides, output_dir=tmp_path))
    return build_module(cfg, with_optimizer=False)


@pytest.mark.parametrize("use_t5", [True, False])
def test_prompt_embeddings_are_the_pipelines_own(use_t5, make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, "model.options.t5_max_length=20", f"model.options.use_t5={use_t5}")
    assert (module.text_encoder_3 is not None) == use_t5
    cond = module.encode_prompts(["a red circle on white", ""])
    assert cond["prompt_embeds"].shape == (2, 77 + 20, 64) and cond["pooled"].shape == (2, 64)
    pipe = module.pipeline()
    for row, prompt in enumerate(["a red circle on white", ""]):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, None, None, do_classifier_free_guidance=False, max_sequence_length=20
        )
        # the same numbers, up to batched-vs-single matmul rounding (we encode both prompts at once)
        torch.testing.assert_close(embeds[0], cond["prompt_embeds"][row], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pooled[0], cond["pooled"][row], rtol=1e-5, atol=1e-6)
    if not use_t5:  # T5's part is zeros, as the pipeline makes it
        assert not cond["prompt_embeds"][:, 77:].any()


def test_full_finetune_without_t5_writes_a_pipeline_without_it(make_cfg, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "out"
    train(make_cfg("model=sd3", "model.finetune=full", "model.options.use_t5=false", "max_train_steps=2", output_dir=out))
    # loaded as diffusers documents for SD3 without T5
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "pipeline", text_encoder_3=None, tokenizer_3=None)
    assert "text_encoder_3" not in {k for k, v in pipe.config.items() if isinstance(v, (list, tuple)) and v[0]}
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images.shape == (
        1,
        64,
        64,
        3,
    )


def test_lora_on_an_int8_transformer_and_t5(make_cfg, tmp_path):
    from optimum.quanto import QLinear

    overrides = ("quantization=int8-quanto", "+quantization.text_encoders.text_encoder_3=int8-quanto")
    module = _module(make_cfg, tmp_path / "m", *overrides)
    to_q = module.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q.base_layer, QLinear)  # quantised, then wrapped by the adapter
    assert any(isinstance(m, QLinear) for m in module.text_encoder_3.modules())
    assert not any(isinstance(m, QLinear) for m in module.text_encoder.modules())
    loss = train(make_cfg("model=sd3", *overrides, "max_train_steps=2", output_dir=tmp_path / "run"))
    assert loss is not None and math.isfinite(loss)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=sd3", "+model.options.t5_max_lenght=10"], "unknown config key 'model.options.t5_max_lenght'. Did you mean 't5_max_length'"),
        (["model=sd3", "model.options.use_t5=maybe"], "model.options"),
        (["model=sd3", "model.min_timestep=100"], "model.min_timestep: DDPM settings, but sd3 is a flow-matching family"),
        (["model=sd3", "callbacks.validation.loss_timesteps=[500]"], "callbacks.validation.loss_timesteps: DDPM"),
        (["model=sd15", "model.timestep_sampling=logit_normal"], "sd15 is a DDPM family"),
        (["model=sd15", "+model.options.t5_max_length=10"], "sd15 has no family options"),
        (["model=sd3", "data.bucket_step=8"], "data.bucket_step=8: this sd3 checkpoint needs image edges divisible by 16"),
    ],
)
def test_family_settings_are_checked_before_loading(overrides, message, make_cfg):
    cfg = make_cfg(*overrides, "model.pretrained_model_name_or_path=/nonexistent")
    with pytest.raises(ConfigError) as err:
        prepare(cfg)
    assert message in str(err.value)


def test_flow_settings_reach_the_noise_schedule(make_cfg, tmp_path):
    module = _module(
        make_cfg, tmp_path, "model.timestep_sampling=mode", "model.loss_weighting=cosmap", "model.min_noise_level=0.2"
    )
    noise = module.noise
    assert noise.kind == "flow" and noise.shift == 3.0  # from the checkpoint's scheduler config
    assert (noise.scheme, noise.weighting, noise.lo) == ("mode", "cosmap", 0.2)
    t = noise.sample(256, torch.Generator().manual_seed(0))
    assert float(t.min()) >= 200 and float(t.max()) <= 1000


def test_validation_encodes_prompts_as_training_does(make_cfg, tmp_path):
    module = _module(make_cfg, tmp_path, "model.options.t5_max_length=20")
    lengths = []
    module.text_encoder_3.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[-1]))
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    module.sample_image(pipe, "a red circle", num_inference_steps=1, width=64, height=64)
    assert lengths and set(lengths) == {20}  # not the pipeline's default of 256
