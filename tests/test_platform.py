"""The family platform's shared parts: loss weights on the loss's device, the zero-terminal-SNR sampling
scheduler, the load-time dtype plan, stopping at an optimiser-step boundary, and decoding outside
autocast."""

import os
import signal

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from tuner.run import build_datamodule, build_module, build_trainer, fit, prepare, train


def _module(make_cfg, tmp_path, *overrides):
    cfg = prepare(make_cfg(*overrides, output_dir=tmp_path))
    return cfg, build_module(cfg, with_optimizer=False)


def test_loss_weights_live_on_the_losss_device(make_cfg, tmp_path):
    """The schedule's weights times prior preservation's, on the device of the timesteps (the loss's),
    never a CPU tensor mixed in: with timesteps on the meta device a stray CPU tensor would show."""
    batch = {"is_regularisation": torch.tensor([True, False])}  # from the data loader: on the CPU
    _, module = _module(make_cfg, tmp_path, "model.prior_loss_weight=0.5")
    module.noise.to("meta")
    weights = module.loss_weights(batch, torch.tensor([10, 500], device="meta"))
    assert weights.device.type == "meta" and weights.dtype == torch.float32

    _, module = _module(make_cfg, tmp_path, "model.min_snr_gamma=5", "model.prior_loss_weight=0.5")
    t = torch.tensor([10, 500])
    weights, plain = module.loss_weights(batch, t), module.noise.weights(t)
    assert weights.device == t.device and weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx([0.5 * plain[0].item(), plain[1].item()])


def test_zero_terminal_snr_exports_a_pipeline_that_samples_from_pure_noise(make_cfg, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "out"
    overrides = ("model.zero_terminal_snr=true", "model.prediction_type=v_prediction", "model.finetune=full")
    train(make_cfg(*overrides, "max_train_steps=1", output_dir=out))
    scheduler = DiffusionPipeline.from_pretrained(out / "pipeline").scheduler
    # SD 1.5's own PNDM ignores rescale_betas_zero_snr; DDIM over trailing timesteps honours it.
    assert type(scheduler).__name__ == "DDIMScheduler" and scheduler.config.timestep_spacing == "trailing"
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6  # alpha-bar at T is (nearly) zero: pure noise


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_the_dtype_plan_loads_in_the_training_dtype_and_keeps_nf4(precision):
    """nf4-bnb needs CUDA to load, so its plan is checked on its own: the denoiser gets the quantisation
    config and its dtype at load, and nothing is cast afterwards."""
    from diffusers import AutoencoderKL, BitsAndBytesConfig, UNet2DConditionModel
    from transformers import CLIPTokenizer, T5EncoderModel

    from models.quantize import load_time_config
    from models.trainable import DTYPES, dtype_plan, load_kwargs

    names = ["unet", "vae", "text_encoder", "tokenizer"]
    plan = dtype_plan(names, "unet", "lora", precision, vae_in_fp32=True)
    assert plan == {"unet": DTYPES[precision], "vae": torch.float32, "text_encoder": DTYPES[precision]}
    assert dtype_plan(names, "unet", "full", precision, vae_in_fp32=False)["unet"] == torch.float32
    qconfig = load_time_config("nf4-bnb", DTYPES[precision])
    kwargs = load_kwargs(UNet2DConditionModel, plan["unet"], {"revision": None}, qconfig)
    assert kwargs["torch_dtype"] == DTYPES[precision] and isinstance(kwargs["quantization_config"], BitsAndBytesConfig)
    assert load_kwargs(T5EncoderModel, torch.bfloat16, {})["dtype"] == torch.bfloat16  # transformers' name
    assert "torch_dtype" in load_kwargs(AutoencoderKL, torch.float32, {})
    assert load_kwargs(CLIPTokenizer, None, {"revision": "r", "variant": "fp16"}) == {"revision": "r"}


def test_frozen_parts_load_in_bf16_and_are_not_cast_after_quantisation(make_cfg, tmp_path):
    from optimum.quanto import QLinear

    _, module = _module(make_cfg, tmp_path, "quantization=int8-quanto", "mixed_precision=bf16")
    assert module.text_encoder.dtype == torch.bfloat16 and module.vae.dtype == torch.bfloat16
    to_q = module.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(to_q.base_layer, QLinear) and to_q.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)


class _SigtermAt(L.Callback):
    """Sends this process a real SIGTERM after micro-batch ``batch_idx``."""

    def __init__(self, batch_idx: int):
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_mid_accumulation_stops_at_the_step_and_resumes_exactly(make_cfg, tmp_path):
    common = ("gradient_accumulation_steps=2", "data.caption_dropout_probability=0.3", "checkpointing_steps=100")
    train(make_cfg(*common, "max_train_steps=5", output_dir=tmp_path / "straight"))

    out = tmp_path / "stopped"
    cfg = prepare(make_cfg(*common, "max_train_steps=5", output_dir=out))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg, out)
    module = build_module(cfg)
    datamodule.attach_encoders(**module.data_encoders())
    trainer = build_trainer(cfg, out, datamodule)
    trainer.callbacks.insert(0, _SigtermAt(batch_idx=4))  # micro-batch 4 is the first half of step 3
    assert fit(trainer, module, datamodule, None, out) is False
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["3"]  # the step, finished

    train(make_cfg(*common, "max_train_steps=5", "resume_from_checkpoint=latest", output_dir=out))
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_decodes_outside_autocast_in_the_vaes_dtype(make_cfg, tmp_path):
    _, module = _module(make_cfg, tmp_path, "model=sdxl", "mixed_precision=bf16")
    seen = []
    module.vae.decoder.register_forward_pre_hook(
        lambda m, args: seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype))
    )
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = module.sample_image(
        pipe,
        "a red circle",
        autocast=torch.autocast("cpu", dtype=torch.bfloat16),
        num_inference_steps=2,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(0),
    )
    assert image.size == (64, 64)
    assert seen == [(False, torch.float32)]  # SDXL's VAE is kept in fp32 and decodes in fp32


def test_a_missing_family_package_is_a_one_line_config_error():
    from tuner.config import ConfigError
    from tuner.config.families import _check_requirements

    family = type("Family", (), {"requires": {"no_such_module_for_tuner": "kolors"}})
    with pytest.raises(ConfigError, match='model=kolors needs the no_such_module_for_tuner package: pip install -e ".\\[kolors\\]"'):
        _check_requirements("kolors", family)
    _check_requirements("sd15", type("Family", (), {"requires": {"torch": "core"}}))


def test_validation_timestep_alias_uses_the_schedules_own_length(tmp_path):
    from types import SimpleNamespace

    from callbacks.validation import Validation

    val = Validation(str(tmp_path), loss_timesteps=(110, 550))
    module = SimpleNamespace(noise=SimpleNamespace(num_timesteps=1100))  # Kolors' schedule
    assert val._levels(module) == (0.1, 0.5)
    assert Validation(str(tmp_path))._levels(module) == (0.1, 0.3, 0.5, 0.7, 0.9)
