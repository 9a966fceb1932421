"""LoRAs for A1111/Forge, ComfyUI and CivitAI: kohya's key layout and ss_* metadata, written beside the
diffusers file, giving the same image when diffusers reads them back (it reads kohya files too)."""

import numpy as np
import pytest
from conftest import generate
from safetensors import safe_open

from tuner.config import ConfigError
from tuner.run import prepare, train


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_kohya_file_gives_the_diffusers_files_image(family, make_cfg, demo_dir, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "my_lora"
    train(
        make_cfg(
            f"model={family}",
            "export.lora_formats=[diffusers,kohya]",
            "model.lora.rank=4",
            "model.lora.alpha=2",
            "optimizer.lr=5e-2",
            "max_train_steps=4",
            "callbacks.validation.enabled=false",
            output_dir=out,
        )
    )
    kohya = out / "my_lora.safetensors"  # named after the output folder (export.name sets it)
    assert (out / "checkpoints" / "4" / "my_lora.safetensors").is_file()  # each checkpoint has one too
    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert alphas == {2.0}  # the trained alpha, not the rank
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0" and meta["ss_steps"] == "4"
    assert meta["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert meta["ss_num_train_images"] == "12" and meta["ss_learning_rate"] == "0.05"
    assert (meta["ss_loss_type"], meta["ss_huber_c"], meta["ss_huber_schedule"]) == ("l2", "0.1", "snr")  # kohya's names

    base = DiffusionPipeline.from_pretrained(demo_dir / family)
    plain = generate(base)
    base.load_lora_weights(out)  # the diffusers-format file
    diffusers_image = generate(base)
    fresh = DiffusionPipeline.from_pretrained(demo_dir / family)
    fresh.load_lora_weights(out, weight_name="my_lora.safetensors")  # the kohya file, as diffusers reads it
    kohya_image = generate(fresh)
    assert np.abs(diffusers_image - plain).mean() > 1e-3  # the LoRA does something
    np.testing.assert_allclose(kohya_image, diffusers_image, atol=1e-5)


def test_kohya_is_refused_where_it_does_not_apply(make_cfg):
    with pytest.raises(ConfigError, match="kohya's LoRA format is for the UNet families"):
        prepare(make_cfg("model=flux", "export.lora_formats=[kohya]", "model.pretrained_model_name_or_path=/none"))
    with pytest.raises(ConfigError, match="is for LoRA runs"):
        prepare(
            make_cfg("model.finetune=full", "export.lora_formats=[kohya]", "model.pretrained_model_name_or_path=/none")
        )
