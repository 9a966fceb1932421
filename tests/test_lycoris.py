"""LyCORIS (LoKr, LoHa) through the lycoris-lora library, as SimpleTuner offers it: every family trains it,
resume and EMA are as for LoRA, and the exported file loads back with the library's own loader."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tuner.config.families import families, family_class
from tuner.run import train

LOKR = ("model.finetune=lycoris", "model.lycoris.algo=lokr", "model.lycoris.factor=4", "optimizer.lr=5e-3")


def _load_onto(denoiser, path, prefix):
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    LycorisNetwork.apply_preset({"lora_prefix": prefix})
    network, weights = create_lycoris_from_weights(1.0, str(path), denoiser)
    return network, weights


@pytest.mark.parametrize("family", list(families()))
def test_every_family_trains_a_lokr_that_the_library_loads(family, make_cfg, demo_dir, tmp_path):
    cls = family_class(family)
    out = tmp_path / family
    train(make_cfg(f"model={family}", *LOKR, "max_train_steps=3", "callbacks.validation.enabled=false", output_dir=out))
    path = out / "pytorch_lora_weights.safetensors"
    prefix = "lora_unet" if cls.denoiser_name == "unet" else "lycoris"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys and all(k.startswith(f"{prefix}_") for k in keys)
    assert any(k.endswith(".lokr_w1") for k in keys) and meta["ss_network_module"] == "lycoris.kohya"
    ckpt = torch.load(out / "checkpoints" / "3" / "checkpoint.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("lycoris_net.") for k in ckpt["state_dict"])  # it alone

    denoiser = type(cls.pipeline_class.from_pretrained(demo_dir / family).components[cls.denoiser_name])
    base = denoiser.from_pretrained(demo_dir / family, subfolder=cls.denoiser_name)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    network, weights = _load_onto(base, path, prefix)
    assert len(network.loras) == len({k.split(".")[0] for k in keys})  # every module of the file found its layer
    network.merge_to()
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # merged into the base weights


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_a_lycoris_run_resumes_exactly_with_its_ema(family, make_cfg, tmp_path):
    common = (f"model={family}", *LOKR, "model.lycoris.algo=loha", "model.lycoris.rank=4", "checkpointing_steps=3")
    common += ("callbacks.validation.enabled=false", "callbacks.ema.enabled=true")
    train(make_cfg(*common, "max_train_steps=5", output_dir=tmp_path / "straight"))
    train(make_cfg(*common, "max_train_steps=3", output_dir=tmp_path / "resumed"))
    train(make_cfg(*common, "max_train_steps=5", "resume_from_checkpoint=latest", output_dir=tmp_path / "resumed"))
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert any(k.endswith(".hada_w1_a") for k in a)  # LoHa's factors


def test_the_exported_lokr_reproduces_the_validation_image(make_cfg, demo_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    train(
        make_cfg(
            *LOKR,
            "optimizer.lr=5e-2",  # enough for 3 steps to move the image visibly
            "max_train_steps=3",
            "callbacks.ema.enabled=false",
            "callbacks.validation.prompts=[a red circle on white]",
            "callbacks.validation.num_inference_steps=4",
            output_dir=out,
        )
    )
    validation = np.asarray(Image.open(out / "validation" / "step_3" / "a_red_circle_on_white.png"), dtype=np.int16)
    pipe = StableDiffusionPipeline.from_pretrained(demo_dir / "sd15")
    pipe.set_progress_bar_config(disable=True)

    def generate():
        image = pipe(
            "a red circle on white",
            num_inference_steps=4,
            guidance_scale=7.5,
            height=64,
            width=64,
            generator=torch.Generator("cpu").manual_seed(42),
        ).images[0]
        return np.asarray(image, dtype=np.int16)

    base_image = generate()
    network, weights = _load_onto(pipe.unet, out / "pytorch_lora_weights.safetensors", "lora_unet")
    network.apply_to()  # as in training: the modules wrap the layers' forward
    network.load_state_dict(weights)
    applied = generate()
    assert np.abs(applied - validation).max() <= 1  # the validation image, up to rounding
    assert np.abs(base_image - validation).mean() > 1  # and not the base model's
    network.restore()
    network.merge_to()  # merged into the weights instead: the same image within float rounding
    assert np.abs(generate() - validation).mean() < 1


def test_lycoris_on_a_quantised_denoiser_is_refused_before_loading(make_cfg):
    from tuner.config import ConfigError
    from tuner.run import prepare

    with pytest.raises(ConfigError, match="LyCORIS wraps plain layers only"):
        prepare(make_cfg(*LOKR, "quantization=int8-quanto", "model.pretrained_model_name_or_path=/none"))
