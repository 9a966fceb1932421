"""The composed config: schemas catch mistakes early, and every preset trains on tiny weights."""

import json
import re
from pathlib import Path

import pytest
from conftest import CONF, compose_cfg, run_cli
from hydra.errors import ConfigCompositionException
from safetensors.torch import load_file

from tuner.config import ConfigError, unknown_key_hint
from tuner.config.families import family_class
from tuner.run import prepare, train

PRESETS = sorted(p.stem for p in Path(CONF, "preset").glob("*.yaml"))


def test_presets_set_real_hub_ids_and_family_defaults():
    assert set(PRESETS) >= {"tiny", "sd15", "sd2", "sdxl"}
    sdxl = compose_cfg(["preset=sdxl"])
    assert sdxl.model.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert sdxl.model._target_ == "models.sdxl.SDXLModule"
    assert sdxl.data.resolution == 1024 and sdxl.model.lora.rank == 16 and sdxl.optimizer.lr == 1e-4
    assert sdxl.data.path is None and sdxl.demo_assets_dir is None  # a real preset brings no data of its own
    assert compose_cfg(["preset=sd2"]).data.resolution == 768


# presets whose checkpoint has a tiny layout of its own (python -m tuner.tiny), and its image edge multiple
TINY_VARIANTS = {"wan22-a14b": ("wan22-a14b", 16), "wan22-5b": ("wan22-ti2v", 32)}


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "tiny"])
def test_every_preset_trains_on_tiny_weights(preset, make_cfg, demo_dir, tmp_path):
    from tuner.config.families import write_tiny

    preset_cfg = compose_cfg([f"preset={preset}"])
    family = preset_cfg.model.family
    weights, step = demo_dir / family, max(16, family_class(family).pixel_multiple)  # LTX's VAE: 32
    if preset in TINY_VARIANTS:
        variant, step = TINY_VARIANTS[preset]
        weights = write_tiny(variant, tmp_path / "tiny" / variant)
    # a preset's training adapter is a Hub file (tests/test_training_adapter.py fetches one from a local Hub)
    adapter = (
        ["model.options.training_adapter=null"] if (preset_cfg.model.options or {}).get("training_adapter") else []
    )
    cfg = make_cfg(
        f"preset={preset}",
        *adapter,
        f"model.pretrained_model_name_or_path={weights}",
        f"data.path={demo_dir / 'images'}",
        "data.resolution=64",
        f"data.bucket_step={step}",
        "data.batch_size=2",
        "max_train_steps=2",
        "lr_scheduler.warmup_steps=1",  # the preset's 100 would be refused: more than the 2 steps
        output_dir=tmp_path,
    )
    assert cfg.mixed_precision.value == "bf16" and cfg.model.gradient_checkpointing  # the preset's own settings
    loss = train(cfg)
    assert loss is not None and loss == loss  # finite, not NaN
    if cfg.model.finetune.value == "full":  # pixart-sigma's default, as its users train it
        assert (tmp_path / "pipeline" / "model_index.json").is_file()
        return
    ups = []
    for tag in ["_high_noise", "_low_noise"] if cfg.model.experts else [""]:  # two experts: a LoRA each
        lora = load_file(tmp_path / f"pytorch_lora_weights{tag}.safetensors")
        ups.append([v for k, v in lora.items() if k.endswith(("lora.up.weight", "lora_B.weight"))])  # UNet or peft keys
    assert all(ups)  # every file holds its layers; up weights start at zero: it trained (two steps: one expert may have)
    assert any(v.abs().sum() > 0 for file in ups for v in file)


def test_hparams_search_lr_sweeps_the_learning_rate():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=lr"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params["optimizer.lr"] == "5e-5,1e-4,2e-4"


def test_steps_and_epochs_together_fail_before_weights_load(tmp_path):
    # The model path does not exist: had anything tried to load it, the error would say so instead.
    result = run_cli(
        "train.py",
        f"output_dir={tmp_path}",
        "model.pretrained_model_name_or_path=/nonexistent",
        "max_train_steps=10",
        "num_train_epochs=2",
    )
    assert result.returncode == 2
    assert "max_train_steps" in result.stderr and "num_train_epochs" in result.stderr
    assert "nonexistent" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_multi_dataset_from_the_command_line(make_cfg, demo_dir, tmp_path):
    images = sorted((demo_dir / "images").glob("*.png"))
    for name, part in (("photos", images[:6]), ("art", images[6:])):
        (tmp_path / name).mkdir()
        for image in part:
            (tmp_path / name / image.name).write_bytes(image.read_bytes())
    cfg = make_cfg(
        f"+data.datasets.photos.path={tmp_path / 'photos'}",
        f"+data.datasets.art={{path:{tmp_path / 'art'},resolution:32,instance_prompt:sks}}",
        "max_train_steps=2",
        output_dir=tmp_path / "out",
    )
    train(cfg)
    report = json.loads((tmp_path / "out" / "dataset_report.json").read_text())
    by_dataset = {}
    for entry in report["usable"]:
        by_dataset.setdefault(entry["dataset"], []).append(entry)
    assert sorted(by_dataset) == ["art", "photos"] and len(by_dataset["art"]) == 6
    assert all(e["caption"].startswith("sks, ") for e in by_dataset["art"])
    assert max(max(e["bucket"]) for e in by_dataset["art"]) < max(max(e["bucket"]) for e in by_dataset["photos"])
    with pytest.raises(ConfigError, match="Did you mean 'resolution'"):
        prepare(make_cfg(f"+data.datasets.photos.path={tmp_path}", "+data.datasets.photos.resolutoin=3"))


def test_sweep_with_ddp_is_refused(demo_dir, tmp_path):
    result = run_cli(
        "train.py",
        "-m",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        f"output_dir={tmp_path}",
        f"demo_assets_dir={demo_dir}",
    )
    assert result.returncode != 0 and "multirun sweep" in result.stderr


def test_steps_or_epochs_must_be_set(make_cfg):
    with pytest.raises(ConfigError, match="neither max_train_steps nor num_train_epochs"):
        prepare(make_cfg("max_train_steps=null"))
    assert prepare(make_cfg("max_train_steps=0", "num_train_epochs=1")).num_train_epochs == 1


def test_fp16_on_cpu_is_refused_before_weights_load(make_cfg):
    with pytest.raises(ConfigError, match="mixed_precision=fp16 needs a GPU"):
        train(make_cfg("mixed_precision=fp16", "model.pretrained_model_name_or_path=/nonexistent"))


def test_misspelled_key_names_it_and_the_valid_keys():
    hint = unknown_key_hint(["optimizer.lrr=1e-4"], CONF)
    assert "optimizer.lrr" in hint and "Did you mean 'lr'" in hint and "weight_decay" in hint
    assert "rank" in unknown_key_hint(["model.lora.rnak=4"], CONF)
    assert unknown_key_hint(["optimizer.lr=1e-4"], CONF) is None


def test_cli_reports_misspelled_key_wrong_type_and_unknown_family():
    typo = run_cli("train.py", "data.batch_sise=4")
    assert typo.returncode == 2 and "data.batch_sise" in typo.stderr and "batch_size" in typo.stderr
    wrong_type = run_cli("train.py", "data.batch_size=four")
    assert wrong_type.returncode != 0 and "data.batch_size" in wrong_type.stderr
    family = run_cli("train.py", "model=sd99")
    assert family.returncode == 2
    assert "sd15" in family.stderr and "sdxl" in family.stderr  # the known families are listed
    assert len(family.stderr.strip().splitlines()) == 1, family.stderr  # one line, not Hydra's ~17
    enum = run_cli("train.py", "model.finetune=lorra")
    assert "lora" in enum.stderr and "full" in enum.stderr


def test_an_unknown_group_choice_is_one_line_with_the_valid_names():
    hint = unknown_key_hint(["preset=sdx"], CONF)
    assert hint.startswith("preset=sdx: there is no preset 'sdx'") and "Did you mean 'sdxl'?" in hint
    assert "flux-dev" in hint and "\n" not in hint
    assert "Valid: " in unknown_key_hint(["+experiment=nope"], CONF)
    for fine in (
        ["model=sdxl"],
        ["model=sd15,sdxl"],
        ["optimizer=adamw8bit"],
        ["hydra.searchpath=[file:///x]", "+experiment=mine"],
    ):
        assert unknown_key_hint(fine, CONF) is None, fine


def test_a_wrong_type_in_an_experiment_file_is_one_line_naming_the_file_and_key(tmp_path):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "bad.yaml").write_text('# @package _global_\nmax_train_steps: "ten"\n')
    hint = unknown_key_hint(["+experiment=bad"], str(conf))
    assert (
        hint
        == f"{conf / 'experiment' / 'bad.yaml'}: max_train_steps: Value 'ten' of type 'str' could not be converted to Integer"
    )
    (conf / "experiment" / "good.yaml").write_text("# @package _global_\nmax_train_steps: 10\n")
    assert unknown_key_hint(["+experiment=good"], str(conf)) is None


def test_enum_and_type_errors_in_compose():
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["mixed_precision=fp8"])
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["data.resolution_type=edges"])


def test_real_preset_without_data_path_fails_early(tmp_path):
    result = run_cli("train.py", "preset=sdxl", f"output_dir={tmp_path}")
    assert result.returncode == 2 and "data.path" in result.stderr


def test_empty_dataset_fails_before_model_loads(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"not a png")
    # A Hub id that is never fetched here: reaching the load would be a different error. (A local path that
    # does not exist is refused before the scan, as one line of its own.)
    result = run_cli(
        "train.py",
        f"data.path={empty}",
        "model.pretrained_model_name_or_path=nobody/not-loaded",
        f"output_dir={tmp_path}",
    )
    assert result.returncode == 2 and "no usable images" in result.stderr


def test_data_multi_needs_both_paths_and_flags_regularisation(make_cfg, demo_dir, tmp_path):
    with pytest.raises(ConfigError, match="data.datasets.regularisation.path"):
        prepare(make_cfg("data=multi", f"data.datasets.subject.path={demo_dir / 'images'}"))
    cfg = prepare(
        make_cfg(
            "data=multi",
            f"data.datasets.subject.path={demo_dir / 'images'}",
            f"data.datasets.regularisation.path={demo_dir / 'images'}",
            output_dir=tmp_path,
        )
    )
    assert cfg.data.datasets.regularisation.is_regularisation_data is True
    assert not cfg.data.datasets.subject.get("is_regularisation_data")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.lora.rank=0", "model.lora.rank=0; it must be >= 1"),
        ("model.lora.rank=-4", "model.lora.rank=-4; it must be >= 1"),
        ("model.lora.alpha=0", "model.lora.alpha=0.0; it must be > 0"),
        ("model.lora.dropout=1", "model.lora.dropout=1.0; valid: 0 up to"),
        ("model.lycoris.rank=0", "model.lycoris.rank=0; it must be >= 1"),
    ],
)
def test_an_adapter_without_a_size_is_refused_before_load(make_cfg, override, message):
    """model.lora.rank=0 used to train at rank 16 (``rank or 16``) without a word."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        prepare(make_cfg(override, "model.pretrained_model_name_or_path=/nonexistent"))
