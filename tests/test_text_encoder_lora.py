"""Text-encoder LoRA (``model.lora.text_encoders``, ``model.lora.text_encoder_lr``): the encoders train beside the
denoiser, in their own optimiser group, with the text-embedding cache off; the export carries them under the keys
diffusers' ``load_lora_weights`` reads and kohya's ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``; and the encoders'
LoRA alone changes what the pipeline draws."""

import numpy as np
import pytest
import torch
from conftest import generate
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from callbacks.checkpoints import CheckpointError
from tuner.config import ConfigError
from tuner.run import build_module, prepare, train

LR, TE_LR = 1e-3, 5e-2
ENCODERS = {"sd15": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"], "kolors": ["text_encoder"],
            "sd3": ["text_encoder", "text_encoder_2"], "flux": ["text_encoder"]}


def _encoder_overrides(family: str, *more: str) -> tuple[str, ...]:
    return (f"model={family}", f"model.lora.text_encoders=[{','.join(ENCODERS[family])}]", f"optimizer.lr={LR}",
            f"model.lora.text_encoder_lr={TE_LR}", *more)


def test_the_text_encoders_lora_trains_in_its_own_group_at_its_own_rate(make_cfg, tmp_path):
    cfg = prepare(make_cfg(*_encoder_overrides("sdxl", "model.lora.plus_ratio=4"), output_dir=tmp_path))
    module = build_module(cfg)
    built = module.build_optimizer(10)
    optimizer = built["optimizer"] if isinstance(built, dict) else built
    names = {id(p): n for n, p in module.named_parameters()}
    rates = {}
    for group in optimizer.param_groups:
        owners = {names[id(p)].split(".", 1)[0] for p in group["params"]}
        kinds = {".lora_B." in names[id(p)] for p in group["params"]}
        assert len(kinds) == 1, "a group mixes LoRA+'s B matrices with the rest"
        rates[(tuple(sorted(owners)), kinds.pop())] = group["lr"]
    assert rates == pytest.approx({
        (("unet",), False): LR, (("unet",), True): 4 * LR,
        (("text_encoder", "text_encoder_2"), False): TE_LR, (("text_encoder", "text_encoder_2"), True): 4 * TE_LR,
    })
    trained = [n for n, p in module.named_parameters() if p.requires_grad and n.startswith("text_encoder")]
    assert trained and all(".lora_" in n for n in trained)  # the encoders' own weights stay frozen
    assert {n.split(".", 1)[0] for n in trained} == {"text_encoder", "text_encoder_2"}
    module.train()  # as Lightning does: the trained encoders train, the frozen parts stay in eval
    assert module.text_encoder.training and module.text_encoder_2.training and not module.vae.training


@pytest.mark.parametrize("family", ["sd15", "sdxl", "kolors", "sd3", "flux"])
def test_the_encoders_lora_alone_changes_the_image(family, make_cfg, demo_dir, tmp_path):
    from diffusers import DiffusionPipeline

    formats = ("export.lora_formats=[diffusers,kohya]", "export.name=run") if family in ("sd15", "sdxl") else ()
    train(make_cfg(*_encoder_overrides(family, "max_train_steps=3", *formats), output_dir=tmp_path / "run"))
    assert "text-embedding cache off: model.lora.text_encoders trains" in (tmp_path / "run" / "train.log").read_text()
    assert not (tmp_path / "run" / "cache" / "text").exists() or not any((tmp_path / "run" / "cache" / "text").rglob("*.pt"))
    state = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    for encoder in ENCODERS[family]:
        assert any(k.startswith(f"{encoder}.") for k in state), f"the export holds no {encoder}. keys"
    encoders_only = {k: v for k, v in state.items() if k.startswith("text_encoder")}
    assert any(v.abs().sum() > 0 for k, v in encoders_only.items() if "lora_linear_layer.up" in k or "lora_B" in k)
    with safe_open(tmp_path / "run" / "pytorch_lora_weights.safetensors", "pt") as f:  # rank, alpha and targets
        save_file(encoders_only, tmp_path / "encoders.safetensors", metadata=f.metadata())

    pipe = DiffusionPipeline.from_pretrained(demo_dir / family)
    before = generate(pipe)
    pipe.load_lora_weights(tmp_path, weight_name="encoders.safetensors")
    assert not np.allclose(generate(pipe), before, atol=1e-4), "loading only the encoders' LoRA left the image as it was"

    if family in ("sd15", "sdxl"):  # kohya's file: lora_te_ for SD's one encoder, lora_te1_/lora_te2_ for SDXL's two
        kohya = load_file(tmp_path / "run" / "run.safetensors")
        prefixes = {k.split("_text_model", 1)[0] for k in kohya if "_text_model" in k}
        assert prefixes == ({"lora_te"} if family == "sd15" else {"lora_te1", "lora_te2"})
        assert any(k.startswith("lora_unet_") for k in kohya)
        with safe_open(tmp_path / "run" / "run.safetensors", "pt") as f:
            meta = f.metadata()
        assert meta["ss_network_train_unet_only"] == "False" and float(meta["ss_text_encoder_lr"]) == TE_LR


def test_a_text_encoder_lora_run_resumes_exactly(make_cfg, tmp_path):
    common = (*_encoder_overrides("sd15"), "checkpointing_steps=2", "data.caption_dropout_probability=0.3")
    train(make_cfg(*common, "max_train_steps=4", output_dir=tmp_path / "straight"))
    train(make_cfg(*common, "max_train_steps=2", output_dir=tmp_path / "resumed"))
    train(make_cfg(*common, "max_train_steps=4", "resume_from_checkpoint=latest", output_dir=tmp_path / "resumed"))
    a, b = (load_file(tmp_path / run / "pytorch_lora_weights.safetensors") for run in ("straight", "resumed"))
    assert any(k.startswith("text_encoder.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint without the encoders' LoRA is not this run's
    with pytest.raises(CheckpointError, match=r"lora_text_encoders: checkpoint \['text_encoder'\], this run \[\]"):
        train(make_cfg("model=sd15", "max_train_steps=4", "resume_from_checkpoint=latest", output_dir=tmp_path / "resumed"))


def test_text_encoder_lora_is_refused_before_load_where_it_cannot_load(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"model.lora.text_encoders=\['text_encoder_2'\]: valid for flux: text_encoder"):
        prepare(make_cfg("model=flux", "model.lora.text_encoders=[text_encoder_2]", output_dir=tmp_path))
    with pytest.raises(ConfigError, match="pixart_sigma's pipeline loads no text-encoder LoRA"):
        prepare(make_cfg("model=pixart_sigma", "model.lora.text_encoders=[text_encoder]", output_dir=tmp_path))
    with pytest.raises(ConfigError, match="model.lora.text_encoders shapes a LoRA, and model.finetune=full"):
        prepare(make_cfg("model.finetune=full", "model.lora.text_encoders=[text_encoder]", output_dir=tmp_path))
    with pytest.raises(ConfigError, match="model.lora.text_encoder_lr=0"):
        prepare(make_cfg("model.lora.text_encoders=[text_encoder]", "model.lora.text_encoder_lr=0", output_dir=tmp_path))
