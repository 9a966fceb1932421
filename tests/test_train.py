"""End to end on tiny pipelines: each family trains, exports in diffusers format and loads back."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import generate
from safetensors.torch import load_file

from tuner.config.families import families, family_class
from tuner.run import train

FAMILIES = list(families())  # conf/model/*.yaml: a new family joins this matrix with no edit here


def _losses(output_dir: Path) -> list[float]:
    (metrics,) = output_dir.glob("logs/*/metrics.csv")
    return [float(r["train/loss_step"]) for r in csv.DictReader(metrics.open()) if r["train/loss_step"]]


# Each family's matrix runs (conftest.MATRIX_RUNS) train once a session; the tests below read them.


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_exports_the_keys_of_its_familys_format(family, matrix_run):
    cls = family_class(family)
    run = matrix_run(family, "lora")
    assert run.loss is not None and np.isfinite(run.loss)
    state = load_file(run.dir / "pytorch_lora_weights.safetensors")
    assert state and all(k.startswith(f"{cls.denoiser_name}.") for k in state)
    attention_only = set(cls.default_lora_targets) <= {"to_k", "to_q", "to_v", "to_out.0"}
    if cls.denoiser_name == "unet" and attention_only:  # diffusers' UNet format, as its UNet scripts write it
        assert all(k.endswith((".lora.down.weight", ".lora.up.weight")) for k in state)
    else:  # peft's, as the transformer scripts write it (and for UNet layers diffusers' mapping lacks, IF's)
        assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    for target in cls.default_lora_targets:  # every default target trained and saved
        assert any(f".{target}." in k for k in state), target
    assert all(v.dtype == torch.float32 for v in state.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_exported_lora_loads_into_its_pipeline_and_changes_the_image(family, matrix_run, demo_dir):
    from diffusers import DiffusionPipeline

    cls = family_class(family)
    run = matrix_run(family, "lora")
    pipe = DiffusionPipeline.from_pretrained(demo_dir / family)
    assert isinstance(pipe, cls.pipeline_class)
    before = generate(pipe)
    cls.load_lora(pipe, run.dir)  # the way the model card tells users to
    after = generate(pipe)
    assert np.abs(after - before).mean() > 1e-3  # the trained LoRA visibly moves the output


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_checkpoints_hold_the_lora_alone_and_the_limit_keeps_the_last_two(family, matrix_run):
    out = matrix_run(family, "lora").dir
    # step checkpoints at 2, 4 and the final 6; the tiny preset's checkpoints_total_limit=2 keeps 4 and 6
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
    assert steps == [4, 6]
    ckpt = torch.load(out / "checkpoints" / "6" / "checkpoint.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])  # frozen weights left out
    assert (out / "checkpoints" / "6" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "train.log").is_file() and (out / "dataset_report.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lora_model_card_shows_the_familys_licence_pipeline_and_loader(family, matrix_run):
    cls = family_class(family)
    card = (matrix_run(family, "lora").dir / "README.md").read_text()
    assert f"license: {cls.license}" in card and f"from diffusers import {cls.pipeline_class.__name__}" in card
    assert cls.lora_load_snippet.format(path=".") in card


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lora_run_validates_with_images_and_a_finite_loss(family, matrix_run):
    out = matrix_run(family, "lora").dir
    # validation (the tiny preset's): images and a finite val/loss
    assert sorted(p.name for p in (out / "validation" / "step_6").glob("*.png"))
    (metrics,) = out.glob("logs/*/metrics.csv")
    val = [float(r["val/loss"]) for r in csv.DictReader(metrics.open()) if r.get("val/loss")]
    assert val and all(np.isfinite(val))


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_writes_a_loadable_pipeline(family, matrix_run, demo_dir):
    from diffusers import DiffusionPipeline

    cls = family_class(family)
    pipe = DiffusionPipeline.from_pretrained(matrix_run(family, "full").dir / "pipeline")
    assert isinstance(pipe, cls.pipeline_class)
    assert generate(pipe).shape[-3:] == (64, 64, 3)  # a video family's: (frames, 64, 64, 3)
    denoiser_cls = type(getattr(pipe, cls.denoiser_name))
    base = denoiser_cls.from_pretrained(demo_dir / family, subfolder=cls.denoiser_name)
    trained = getattr(pipe, cls.denoiser_name)
    changed = [not torch.equal(a, b) for a, b in zip(base.parameters(), trained.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_checkpoints_the_denoiser_under_its_own_name(family, matrix_run):
    cls = family_class(family)
    out = matrix_run(family, "full").dir
    assert (out / "checkpoints" / "3" / cls.denoiser_name / "config.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_is_bit_identical_for_every_family(family, matrix_run):
    """k steps, a resume, then N-k steps give the straight run's weights, live and EMA (the LoRA run is the
    straight one)."""
    straight, resumed = matrix_run(family, "lora").dir, matrix_run(family, "resumed").dir
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("finetune,lr", [("lora", "1e-2"), ("full", "1e-3")])
def test_overfitting_one_image_lowers_the_loss(finetune, lr, make_cfg, demo_dir, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(sorted((demo_dir / "images").glob("*.png"))[0], one)
    out = tmp_path / "out"
    cfg = make_cfg(
        f"data.path={one}",
        "data.caption_dropout_probability=0",
        f"model.finetune={finetune}",
        f"optimizer.lr={lr}",
        "model.min_timestep=400",  # a narrow timestep band keeps the loss comparable step to step
        "model.max_timestep=600",
        "max_train_steps=50",
        "checkpointing_steps=0",
        output_dir=out,
    )
    train(cfg)
    losses = _losses(out)
    assert len(losses) == 50
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.85 * first, (first, last)


def test_sdxl_time_ids_come_from_each_samples_size_and_crop(make_cfg, tmp_path):
    """One 100x70 image: 64 px area buckets in steps of 16 give 80x48, so it is resized to 80x56 and
    centre-cropped 4 px from the top. SDXL's time ids are (orig h, orig w, crop y, crop x, target h, w)."""
    from hydra.utils import instantiate
    from PIL import Image

    from tuner.run import prepare

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (100, 70), "blue").save(data / "a blue card.png")
    cfg = prepare(make_cfg("model=sdxl", f"data.path={data}", "data.batch_size=1", output_dir=tmp_path / "out"))
    dm = instantiate(cfg.data, seed=0)
    dm.scan()
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (1, 3, 48, 80)

    module = instantiate(cfg.model, optimizer=None, lr_scheduler=None)
    seen = {}
    module.unet.register_forward_pre_hook(lambda m, a, kw: seen.update(kw["added_cond_kwargs"]), with_kwargs=True)
    module.compute_loss(batch, torch.Generator().manual_seed(0))
    assert seen["time_ids"].tolist() == [[70.0, 100.0, 4.0, 0.0, 48.0, 80.0]]
    assert seen["text_embeds"].shape == (1, 32)  # the second encoder's pooled projection


def test_lora_alpha_survives_export(make_cfg, demo_dir, tmp_path):
    from diffusers import DiffusionPipeline

    train(make_cfg("model.lora.rank=4", "model.lora.alpha=16", "max_train_steps=2", output_dir=tmp_path))
    pipe = DiffusionPipeline.from_pretrained(demo_dir / "sd15")
    pipe.load_lora_weights(tmp_path)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert list(layer.scaling.values()) == [4.0]  # alpha / rank, as trained


def test_sdxl_vae_encodes_in_fp32_under_bf16(make_cfg, tmp_path):
    from hydra.utils import instantiate

    from tuner.run import prepare

    cfg = prepare(make_cfg("model=sdxl", output_dir=tmp_path))
    module = instantiate(cfg.model, optimizer=None, lr_scheduler=None, mixed_precision="bf16")
    dtypes = []
    module.vae.encoder.conv_in.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = module.encode_images(torch.zeros(1, 3, 64, 64), torch.Generator().manual_seed(0))
    assert dtypes == [torch.float32] and latents.dtype == torch.float32
    assert module.text_encoder.dtype == torch.bfloat16  # the other frozen parts do run in bf16


def test_full_export_keeps_base_scheduler_and_precision(make_cfg, demo_dir, tmp_path):
    from diffusers import DiffusionPipeline

    train(
        make_cfg("model=sdxl", "model.finetune=full", "mixed_precision=bf16", "max_train_steps=1", output_dir=tmp_path)
    )
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.text_encoder.dtype == pipe.vae.dtype == pipe.unet.dtype == torch.float32


def test_zero_terminal_snr_with_min_snr_stays_finite(make_cfg, tmp_path):
    from hydra.utils import instantiate

    from tuner.run import prepare

    cfg = prepare(
        make_cfg(
            "model.zero_terminal_snr=true",
            "model.min_snr_gamma=5",
            "model.min_timestep=998",  # only the last two timesteps, where SNR is (nearly) zero
            output_dir=tmp_path,
        )
    )
    module = instantiate(cfg.model, optimizer=None, lr_scheduler=None)
    # It samples with a scheduler that honours the rescaled betas (PNDM, SD 1.5's own, ignores them).
    scheduler = module.pipeline().scheduler
    assert type(scheduler).__name__ == "DDIMScheduler" and scheduler.config.timestep_spacing == "trailing"
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6
    dm = instantiate(cfg.data, seed=0)
    dm.scan()
    loss = module.compute_loss(next(iter(dm.train_dataloader())), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_yaml_shows_its_options_with_their_defaults(family):
    """conf/model/<family>.yaml lists the family's Options (so they override without '+'), as declared."""
    import dataclasses

    import yaml

    from tuner.config.families import CONF

    doc = yaml.safe_load((CONF / "model" / f"{family}.yaml").read_text())
    declared = {f.name: f.default for f in dataclasses.fields(family_class(family).Options)}
    assert (doc.get("options") or {}) == declared


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_wraps_an_int8_denoiser(family, make_cfg, tmp_path):
    from optimum.quanto import QLinear

    from tuner.run import build_module, prepare

    cfg = prepare(make_cfg(f"model={family}", "quantization=int8-quanto", output_dir=tmp_path / "m"))
    module = build_module(cfg, with_optimizer=False)
    wrapped = [m for m in module.denoiser.modules() if hasattr(m, "lora_A")]
    assert wrapped and all(isinstance(m.base_layer, QLinear) for m in wrapped)  # quantised, then adapted


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_on_an_int8_denoiser(family, matrix_run):
    loss = matrix_run(family, "int8").loss
    assert loss is not None and np.isfinite(loss)
