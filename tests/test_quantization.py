"""Quantised base models: LoRA trains on top of every quanto level, the result loads into the plain
base pipeline, and what cannot work is refused before any weight loads."""

import math

import numpy as np
import pytest
import torch

from tuner.config import ConfigError
from tuner.run import prepare, train


@pytest.mark.parametrize("level", ["int4-quanto", "int2-quanto", "fp8-quanto"])
def test_lora_trains_on_a_quantised_base(level, make_cfg, tmp_path):
    loss = train(make_cfg(f"quantization={level}", "max_train_steps=2", output_dir=tmp_path))
    assert loss is not None and math.isfinite(loss)


def test_lora_trains_on_an_int8_quantised_base(matrix_run):
    """int8's run here would be the family matrix's int8 run of SD 1.5 (the default family), setting for setting:
    read that one instead of training it twice."""
    loss = matrix_run("sd15", "int8").loss
    assert loss is not None and math.isfinite(loss)


def test_quantised_training_gives_a_lora_for_the_unquantised_pipeline(make_cfg, demo_dir, tmp_path):
    from diffusers import DiffusionPipeline
    from hydra.utils import instantiate
    from optimum.quanto import QLinear

    cfg = prepare(
        make_cfg("quantization=int8-quanto", "quantization.text_encoder_precision=int8-quanto", output_dir=tmp_path)
    )
    module = instantiate(
        cfg.model,
        optimizer=None,
        lr_scheduler=None,
        base_model_precision="int8-quanto",
        text_encoder_precision="int8-quanto",
    )
    to_q = module.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(to_q.base_layer, QLinear)  # quantised first, then the adapter wraps it
    assert any(isinstance(m, QLinear) for m in module.text_encoder.modules())
    assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)

    out = tmp_path / "run"
    train(make_cfg("quantization=int8-quanto", "optimizer.lr=5e-2", "max_train_steps=4", output_dir=out))
    pipe = DiffusionPipeline.from_pretrained(demo_dir / "sd15")
    generate = dict(num_inference_steps=3, height=64, width=64, output_type="np")
    before = pipe("a red circle", generator=torch.Generator().manual_seed(0), **generate).images[0]
    pipe.load_lora_weights(out)
    after = pipe("a red circle", generator=torch.Generator().manual_seed(0), **generate).images[0]
    assert np.abs(after - before).mean() > 1e-3


def test_full_finetune_of_a_quantised_base_is_refused(make_cfg):
    with pytest.raises(ConfigError, match="cannot be fully fine-tuned"):
        prepare(make_cfg("quantization=int8-quanto", "model.finetune=full"))


def test_nf4_without_cuda_is_refused_before_loading(make_cfg):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nf4-bnb can run here")
    # The model path does not exist: the refusal must come before anything is loaded.
    with pytest.raises(ConfigError, match="nf4-bnb .* needs a CUDA GPU"):
        train(make_cfg("quantization=nf4-bnb", "model.pretrained_model_name_or_path=/nonexistent"))


def test_device_problems_are_named():
    from models.quantize import device_problem

    assert "Apple" in device_problem("fp8-quanto", "auto", cuda=False, mps=True)
    assert device_problem("fp8-quanto", "gpu", cuda=True, mps=False) is None
    assert device_problem("int4-quanto", "cpu", cuda=False, mps=False) is None
    assert device_problem("nf4-bnb", "auto", cuda=True, mps=False) is None


def test_an_8bit_optimiser_on_a_quantised_base(make_cfg, tmp_path):
    # The seed: "any optimiser should work" with a quantised base.
    loss = train(make_cfg("quantization=int4-quanto", "optimizer=adamw8bit", "max_train_steps=2", output_dir=tmp_path))
    assert loss is not None and math.isfinite(loss)


def test_each_text_encoder_takes_its_own_level(make_cfg, tmp_path, caplog):
    from hydra.utils import instantiate
    from optimum.quanto import QLinear

    cfg = prepare(make_cfg("model=sdxl", "+quantization.text_encoders.text_encoder_2=int8-quanto", output_dir=tmp_path))
    module = instantiate(cfg.model, optimizer=None, lr_scheduler=None, text_encoders=dict(cfg.quantization.text_encoders))
    assert any(isinstance(m, QLinear) for m in module.text_encoder_2.modules())
    assert not any(isinstance(m, QLinear) for m in module.text_encoder.modules())
    # The old SDXL-shaped key still works, with a deprecation line.
    with caplog.at_level("WARNING"):
        cfg = prepare(make_cfg("model=sdxl", "quantization.text_encoder_2_precision=int8-quanto", output_dir=tmp_path))
    assert dict(cfg.quantization.text_encoders) == {"text_encoder_2": "int8-quanto"}
    assert "text_encoder_2_precision is deprecated" in caplog.text
    # A name the family does not have fails before loading, listing the ones it has.
    with pytest.raises(ConfigError, match="sd15 has no such text encoder; valid: text_encoder$"):
        prepare(make_cfg("+quantization.text_encoders.text_encoder_3=int8-quanto", output_dir=tmp_path))


def test_nf4_on_a_text_encoder_is_refused_not_ignored(make_cfg):
    with pytest.raises(ConfigError, match="nf4 applies to the denoiser .* only"):
        prepare(make_cfg("quantization.text_encoder_precision=nf4-bnb"))
