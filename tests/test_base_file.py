"""A base model from one file: a single-file checkpoint (``model.pretrained_model_name_or_path=FILE.safetensors``
with ``model.base_config``), or a diffusers base with a denoiser-only file (``model.denoiser_file``). Offline: the
files are written from the tiny pipelines (``python -m tuner.export single-file``, or the denoiser's weights), and
training from them starts exactly where training from the folder does."""

import shutil

import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

from callbacks.checkpoints import CheckpointError
from tuner.config import ConfigError
from tuner.interop.base_file import digest
from tuner.run import prepare, train

ONE_STEP = ("max_train_steps=1", "checkpointing_steps=1")


def _first_loss(make_cfg, out, *overrides):
    return train(make_cfg(*ONE_STEP, *overrides, output_dir=out))


def test_training_from_a_single_file_checkpoint_starts_as_from_the_folder(make_cfg, demo_dir, tmp_path):
    file = tmp_path / "civitai" / "my_model.safetensors"
    run_cli("-m", "tuner.export", "single-file", str(demo_dir / "sd15"), str(file))
    folder = _first_loss(make_cfg, tmp_path / "folder", "model=sd15")
    single = _first_loss(
        make_cfg, tmp_path / "file", "model=sd15", f"model.pretrained_model_name_or_path={file}",
        f"model.base_config={demo_dir / 'sd15'}",
    )
    assert single == folder
    state = torch.load(next((tmp_path / "file" / "checkpoints").rglob("*.ckpt")), weights_only=False)
    assert state["tuner_model"]["base_model"] == f"sha256:{digest(file)}"  # the file's hash, not its path
    assert f"pretrained_model_name_or_path: {file}" in (tmp_path / "file" / ".hydra" / "config.yaml").read_text()

    # the same file elsewhere resumes; another file does not pass for it
    moved = shutil.copy(file, tmp_path / "moved.safetensors")
    common = ("model=sd15", f"model.base_config={demo_dir / 'sd15'}", "checkpointing_steps=1")
    train(make_cfg(*common, f"model.pretrained_model_name_or_path={moved}", "max_train_steps=2",
                   "resume_from_checkpoint=latest", output_dir=tmp_path / "file"))
    other = tmp_path / "other.safetensors"
    run_cli("-m", "tuner.export", "single-file", str(demo_dir / "sd15"), str(other), "--half")
    with pytest.raises(CheckpointError, match="another base model"):
        train(make_cfg(*common, f"model.pretrained_model_name_or_path={other}", "max_train_steps=3",
                       "resume_from_checkpoint=latest", output_dir=tmp_path / "file"))


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_denoiser_file_replaces_the_bases_denoiser(family, make_cfg, demo_dir, tmp_path):
    """SDXL's UNet in the original (LDM) layout, Flux's transformer in diffusers' names: what fine-tunes ship."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(demo_dir / family)
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    if family == "sdxl":
        from tuner.interop.single_file import unet_to_ldm

        state = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(denoiser).items()}
    else:
        state = dict(denoiser.state_dict())
    file = tmp_path / f"{family}_finetune.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, file)
    folder = _first_loss(make_cfg, tmp_path / "folder", f"model={family}")
    replaced = _first_loss(make_cfg, tmp_path / "file", f"model={family}", f"model.denoiser_file={file}")
    assert replaced == folder
    state = torch.load(next((tmp_path / "file" / "checkpoints").rglob("*.ckpt")), weights_only=False)
    assert state["tuner_model"]["base_model"].endswith(f"=sha256:{digest(file)}")


def test_a_file_base_is_checked_before_anything_loads(make_cfg, demo_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained_model_name_or_path=.*missing.safetensors: no such file"):
        prepare(make_cfg("model=sd15", f"model.pretrained_model_name_or_path={tmp_path}/missing.safetensors",
                         output_dir=tmp_path / "a"))
    with pytest.raises(ConfigError, match="model.denoiser_file=.*: no such file"):
        prepare(make_cfg("model=flux", f"model.denoiser_file={tmp_path}/none.safetensors", output_dir=tmp_path / "b"))
    with pytest.raises(ConfigError, match="model.base_config is for a single-file base"):
        prepare(make_cfg("model=sd15", f"model.base_config={demo_dir / 'sd15'}", output_dir=tmp_path / "c"))
    (tmp_path / "kolors.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="kolors's pipeline does not read single files"):
        prepare(make_cfg("model=kolors", f"model.pretrained_model_name_or_path={tmp_path}/kolors.safetensors",
                         output_dir=tmp_path / "d"))
