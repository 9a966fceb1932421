"""`python -m tuner.import simpletuner`: SimpleTuner configs become experiments the real config accepts.

The configs in tests/data/simpletuner/ are shaped like SimpleTuner's published examples (written here
from its documented keys). Each is imported, composed with `+experiment=NAME` from a temp search path
and run through `tuner.run.prepare` (no weights load); the values must land where tuner reads them,
unknown keys must be reported with a reason, and inline secrets must not reach the file or the output.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from conftest import CONF, ROOT, run_cli
from hydra import compose, initialize_config_dir

from tuner.run import prepare

importer = importlib.import_module("tuner.import")  # `import` is a keyword: no plain import statement
DATA = Path(__file__).parent / "data" / "simpletuner"


def _import(tmp_path: Path, capsys, config: Path, *extra: str) -> tuple[Path, str, str]:
    """The CLI in this process: the experiment's path, its text and the CLI's stderr."""
    out = tmp_path / "experiment" / f"{config.stem}.yaml"
    assert importer.main(["simpletuner", str(config), *extra, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "tuner's config check: passed" in err
    return out, out.read_text(), err


def _compose(tmp_path: Path, name: str, *overrides: str):
    """``python train.py +experiment=NAME`` with the experiment in ``tmp_path/experiment``, checked."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={name}", f"hydra.searchpath=[file://{tmp_path}]", *overrides])
    return prepare(cfg)


def test_flux_lora_through_the_command_line(tmp_path):
    out = tmp_path / "experiment" / "flux_lora.yaml"
    result = run_cli("-m", "tuner.import", "simpletuner", str(DATA / "flux_lora.json"), "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# @package _global_\n") and "- override /preset: flux-dev" in text
    assert "tuner's config check: passed" in result.stderr
    assert "frobnicate_level: tuner has no equivalent setting" in result.stderr
    assert "#   frobnicate_level: tuner has no equivalent setting" in text
    assert "flux has no text_encoder_3" in text  # even a no-op key is listed, never dropped silently
    # the inline Hub token: left out, and the output says where it goes instead
    assert "hf_DoNotCopyThisTokenAnywhere123" not in text + result.stdout + result.stderr
    assert "hub_token: set HF_TOKEN" in result.stderr and "hub_token: set HF_TOKEN" in text

    cfg = _compose(tmp_path, "flux_lora")
    model = cfg.model
    assert (model.family, model.pretrained_model_name_or_path) == ("flux", "black-forest-labs/FLUX.1-dev")
    assert (model.finetune, model.lora.rank, model.lora.alpha) == ("lora", 32, 32.0)
    assert model.lora.target_modules == ["attention+ffn"] and model.options.guidance == 1.0
    assert model.gradient_checkpointing is True
    assert cfg.output_dir.endswith("output/flux-lora") and cfg.seed == 1234
    run = (cfg.max_train_steps, cfg.checkpointing_steps, cfg.checkpoints_total_limit, cfg.resume_from_checkpoint)
    assert run == (3000, 500, 4, "latest")
    assert (cfg.mixed_precision, cfg.gradient_accumulation_steps, cfg.max_grad_norm) == ("bf16", 2, 0.5)
    assert (cfg.optimizer._target_, cfg.optimizer.lr) == (
        "torch.optim.AdamW",
        1e-4,
    )  # adamw_bf16, not the preset's 8-bit
    assert cfg.lr_scheduler._target_.endswith(".cosine") and cfg.lr_scheduler.warmup_steps == 50
    assert cfg.quantization.base_model_precision == "int8-quanto"
    assert cfg.quantization.text_encoders == {"text_encoder": "no_change", "text_encoder_2": "int8-quanto"}
    assert (cfg.data.batch_size, cfg.data.caption_dropout_probability) == (2, 0.05)
    assert list(cfg.data.datasets) == ["corgi"]  # the text-embed cache backend is no dataset
    corgi = cfg.data.datasets.corgi
    assert corgi.path == "datasets/corgi" and corgi.caption_strategy == "textfile" and corgi.repeats == 2
    assert (corgi.resolution, corgi.resolution_type, corgi.crop, corgi.minimum_image_size) == (1024, "area", False, 512)
    assert cfg.data.cache_dir == "cache/vae/flux/corgi"
    val = cfg.callbacks.validation
    assert val.enabled and val.prompts == ["a photo of a corgi wearing a tiny hat"]
    assert (val.every_n_steps, val.guidance_scale, val.num_inference_steps, val.resolution, val.seed) == (
        250,
        3.0,
        20,
        1024,
        7,
    )
    assert cfg.logger._target_.endswith("WandbLogger") and (cfg.logger.project, cfg.logger.name) == (
        "flux-corgi",
        "rank32",
    )
    hub = cfg.callbacks.hub
    assert (hub.push_to_hub, hub.model_name, hub.push_checkpoints) == (True, "flux-corgi-lora", False)
    assert cfg.callbacks.webhook.config == str(DATA / "webhook.json")  # a file of the seed's format: kept as a path

    # and `python train.py +experiment=NAME` itself accepts it
    shown = run_cli(
        str(ROOT / "train.py"), "+experiment=flux_lora", f"hydra.searchpath=[file://{tmp_path}]", "--cfg", "job"
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "project: flux-corgi" in shown.stdout and "target_modules:\n    - attention+ffn" in shown.stdout


def test_sd3_lora_keys_without_dashes(tmp_path, capsys):
    out, text, err = _import(tmp_path, capsys, DATA / "sd3_lora.json")
    assert "- override /preset: sd35" in text
    assert "snr_gamma: sd3 trains with flow noise" in err  # min-SNR weights DDPM losses only
    assert "wibble_factor: tuner has no equivalent setting" in err and "#   wibble_factor" in text
    for secret in ("abcSECRETdef", "discord.com/api/webhooks", "wJalrXUtnFEMI"):
        assert secret not in text and secret not in err
    assert "webhook_config: inline webhook settings" in err and "callbacks.webhook.config=FILE" in err
    assert "aws_secret_access_key: set AWS_SECRET_ACCESS_KEY" in err

    cfg = _compose(tmp_path, "sd3_lora")
    model = cfg.model
    assert (model.family, model.pretrained_model_name_or_path) == ("sd3", "stabilityai/stable-diffusion-3.5-medium")
    assert (model.lora.rank, model.lora.alpha, model.flow_shift, model.min_snr_gamma) == (16, 8.0, 3.0, None)
    assert model.options.t5_max_length == 154  # over the sd35 preset's 256
    assert (cfg.num_train_epochs, cfg.max_train_steps or 0, cfg.checkpointing_steps) == (10, 0, 1000)
    assert cfg.optimizer._target_ == "optimi.StableAdamW"
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (8e-5, 0.02)
    sched = cfg.lr_scheduler
    assert sched._target_.endswith(".polynomial") and (sched.power, sched.lr_end, sched.warmup_steps) == (
        2.0,
        1e-6,
        100,
    )
    assert cfg.quantization.text_encoders == {"text_encoder_3": "int8-quanto"}
    assert cfg.quantization.base_model_precision == "no_change"
    assert (cfg.callbacks.ema.enabled, cfg.callbacks.ema.decay) == (True, 0.999)
    val = cfg.callbacks.validation
    assert val.prompt_library == str(DATA / "prompt_library.json") and val.negative_prompt == "blurry, low quality"
    assert (val.resolution, val.guidance_scale) == (1024, 5.0)
    assert cfg.logger._target_.endswith("TensorBoardLogger") and cfg.callbacks.webhook.config is None
    data = cfg.data
    assert data.path == "datasets/paintings" and (data.resolution, data.resolution_type) == (1.0, "area")
    assert data.minimum_image_size == 500  # 0.25 megapixels as the shorter edge of a square, reported
    assert "minimum_image_size=0.25 (area) -> 500 px" in err


def test_sdxl_lycoris_lokr(tmp_path, capsys):
    out, text, err = _import(tmp_path, capsys, DATA / "sdxl_lokr.json")
    assert "lycoris_config.apply_preset: the adapter targets the family's LoRA modules" in err
    assert "base_model_precision: 'int8-torchao'" in err and "the nearest is int8-quanto" in err
    assert "validation_resolution: cannot use '1024x768'" in err and "seed: a random seed per run" in err
    assert "instance_prompt: SimpleTuner uses it only with prepend_instance_prompt" in err
    assert "xyzzy: tuner has no equivalent setting" in err

    cfg = _compose(tmp_path, "sdxl_lokr")
    model = cfg.model
    assert model.family == "sdxl" and model.finetune == "lycoris"
    assert dict(model.lycoris) == {"algo": "lokr", "rank": 10000, "alpha": 1.0, "factor": 12, "dropout": 0.0}
    assert (model.min_snr_gamma, model.noise_offset, model.prediction_type) == (5.0, 0.05, "epsilon")
    assert (cfg.optimizer._target_, cfg.optimizer.lr) == ("bitsandbytes.optim.Lion8bit", 4e-5)
    assert cfg.lr_scheduler._target_.endswith(".sine") and cfg.mixed_precision == "fp16"
    assert cfg.quantization.base_model_precision == "no_change" and not cfg.logger
    assert cfg.seed == 42 and cfg.callbacks.validation.resolution is None
    assert cfg.data.path == "datasets/pixel-art" and cfg.data.instance_prompt is None


def test_dreambooth_with_regularisation_backends(tmp_path, capsys):
    backend = DATA / "multidatabackend.json"
    out, text, err = _import(tmp_path, capsys, DATA / "dreambooth.json", "--backend", str(backend))
    assert "backend old-photos: disabled in SimpleTuner" in err
    assert "backend text-embeds: a text_embeds cache" in err
    assert "report_to: 'comet_ml'" in err and "unknown_dreambooth_knob: tuner has no equivalent setting" in err
    for secret in ("AKIAEXAMPLEKEYID0000", "s3cr3t/EXAMPLE/KEY/do-not-copy"):
        assert secret not in text and secret not in err
    assert "backend dogs-regularisation: aws_access_key_id: set AWS_ACCESS_KEY_ID in the environment" in err
    assert "aws_secret_access_key: set AWS_SECRET_ACCESS_KEY in the environment" in err
    assert "aws_region_name: set AWS_DEFAULT_REGION" in err

    cfg = _compose(tmp_path, "dreambooth")
    assert cfg.model.prior_loss_weight == 0.5 and cfg.model.lora.rank == 8
    assert list(cfg.data.datasets) == ["sks-dog", "dogs-regularisation"]
    subject, reg = cfg.data.datasets["sks-dog"], cfg.data.datasets["dogs-regularisation"]
    assert (subject.caption_strategy, subject.instance_prompt) == ("instanceprompt", "a photo of sks dog")
    assert (subject.repeats, subject.crop, subject.crop_style, subject.crop_aspect) == (10, True, "center", "square")
    assert (subject.resolution, subject.resolution_type, subject.minimum_image_size) == (1024, "area", 768)
    assert not subject.get("is_regularisation_data")
    assert reg.path == "s3://my-training-data/regularisation/dogs/" and reg.endpoint_url == "http://127.0.0.1:9000"
    assert reg.is_regularisation_data and reg.probability == 0.5 and reg.get("instance_prompt") is None
    assert (reg.resolution, reg.maximum_image_size, reg.target_downsample_size) == (1.0, 2.0, 1.5)
    assert reg.crop_aspect == "closest" and reg.crop_aspect_buckets == [1.0, 0.75, 1.5]
    assert cfg.data.cache_dir == "cache/vae/sdxl/sks-dog"  # one cache for all, the others reported
    assert "'cache/vae/sdxl/regularisation' -> data.cache_dir" in err
    assert (cfg.data.caption_dropout_probability, cfg.data.resolution_type) == (0.0, "area")


def test_csv_backend_becomes_a_table_dataset(tmp_path, capsys):
    config, backend = tmp_path / "config.json", tmp_path / "backend.json"
    config.write_text(json.dumps({"--model_family": "sd1x", "--model_type": "lora", "--max_train_steps": 1000}))
    entry = {"id": "urls", "type": "csv", "csv_file": "photos.csv", "csv_caption_column": "caption"}
    entry |= {"csv_url_column": "url", "csv_cache_dir": "cache/csv", "caption_strategy": "csv", "repeats": 1}
    backend.write_text(json.dumps([entry]))
    _import(tmp_path, capsys, config, "--backend", str(backend))
    cfg = _compose(tmp_path, "config")
    urls = cfg.data.datasets.urls
    assert (urls.path, urls.image_column, urls.caption_column, urls.caption_strategy) == (
        "photos.csv",
        "url",
        "caption",
        "column",
    )
    assert cfg.model.family == "sd15" and cfg.data.cache_dir == "cache/csv"


def test_a_value_tuner_refuses_is_caught_by_the_real_check(tmp_path, capsys):
    config = tmp_path / "full.json"
    settings = {"model_family": "sdxl", "model_type": "full", "base_model_precision": "int8-quanto"}
    config.write_text(json.dumps(settings | {"instance_data_dir": str(tmp_path)}))
    out = tmp_path / "full.yaml"
    assert importer.main(["simpletuner", str(config), "-o", str(out)]) == 2  # not 0: train.py would refuse it
    err = capsys.readouterr().err
    assert "tuner: error: tuner's config check fails" in err
    assert "model.finetune=full with quantization.base_model_precision=int8-quanto" in err.splitlines()[-1]


def test_what_cannot_be_imported_at_all_is_one_line(tmp_path, capsys):
    config = tmp_path / "auraflow.json"
    config.write_text(json.dumps({"--model_family": "auraflow"}))
    assert importer.main(["simpletuner", str(config), "-o", str(tmp_path / "x.yaml")]) == 2
    assert "model_family='auraflow'; tuner trains: sd1x" in capsys.readouterr().err
    (tmp_path / "x.yaml").write_text("mine")
    assert importer.main(["simpletuner", str(DATA / "sd3_lora.json"), "-o", str(tmp_path / "x.yaml")]) == 2
    assert "exists; add --force" in capsys.readouterr().err and (tmp_path / "x.yaml").read_text() == "mine"


def test_current_key_names_map_like_their_deprecated_aliases():
    """checkpoint_step_interval / validation_step_interval: SimpleTuner's names now (issue 24)."""
    from tuner.interop.simpletuner import convert

    res = convert(DATA / "flux_lycoris_current.json")
    assert res.get("checkpointing_steps") == 50 and res.get("callbacks.validation.every_n_steps") == 25
    assert res.get("callbacks.hub.model_name") == "flux-lycoris-test" and res.get("callbacks.ema.on_cpu") is True
    assert not [key for key, _ in res.unmapped if "interval" in key or key == "ema_cpu_only"], res.unmapped


def test_keys_left_out_carry_simpletuners_defaults_not_the_presets(tmp_path, capsys):
    """flux-dev's preset quantises (int8) and warms up 100 steps; SimpleTuner's defaults do neither: a LyCORIS run
    that leaves base_model_precision and lr_warmup_steps out passes tuner's check, without warm-up (issue 24)."""
    out, text, err = _import(tmp_path, capsys, DATA / "flux_lycoris_current.json")
    assert "base_model_precision is not set: SimpleTuner's default no_change" in err and "model.finetune=lycoris" in err
    assert "lr_warmup_steps is not set: SimpleTuner's default 0" in err
    cfg = _compose(tmp_path, "flux_lycoris_current")
    assert cfg.quantization.base_model_precision == "no_change" and cfg.model.finetune == "lycoris"
    assert cfg.lr_scheduler.warmup_steps == 0 and cfg.max_train_steps == 100 and cfg.model.lora.rank == 16


def test_placeholders_are_filled_as_simpletuner_fills_them(tmp_path, capsys, monkeypatch):
    """{model_family}, {id}, {output_dir} in a backend; {env:NAME} anywhere, read when the run starts (issue 24)."""
    monkeypatch.setenv("TUNER_TEST_RUN", "run7")
    out, text, err = _import(tmp_path, capsys, DATA / "placeholders.json")
    assert "{model_family}" not in text and "{id}" not in text and "{env:" not in text
    cfg = _compose(tmp_path, "placeholders")
    assert cfg.data.cache_dir == "cache/vae/flux/teddy" and cfg.data.datasets.teddy.path == "datasets/teddy"
    assert "output/${oc.env:TUNER_TEST_RUN,''}/cache/text/flux\" -> data.cache_dir" in err  # {output_dir} filled
    assert cfg.output_dir.endswith("output/run7")


def test_relative_paths_resolve_from_simpletuners_root_or_the_configs_folder(tmp_path, capsys, monkeypatch):
    """A config in config/examples/NAME/ names its files from SimpleTuner's root; an absolute path from another
    machine is looked for beside the config; what is not found names every path tried (issue 24)."""
    config = DATA / "config" / "examples" / "sdxl.lycoris-lokr" / "config.json"
    monkeypatch.chdir(tmp_path)  # SimpleTuner's root is not the current directory here
    out, text, err = _import(tmp_path, capsys, config)
    cfg = _compose(tmp_path, "config")
    assert cfg.model.finetune == "lycoris" and cfg.model.lycoris.factor == 8
    assert list(cfg.data.datasets) == ["pixel-art"] and cfg.data.cache_dir == "cache/vae/sdxl/pixel-art"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(json.loads(config.read_text()) | {"lycoris_config": "config/nowhere.json"}))
    assert importer.main(["simpletuner", str(broken), "-o", str(tmp_path / "broken.yaml")]) == 2
    err = capsys.readouterr().err
    assert "lycoris_config='config/nowhere.json' is not found; tried: " in err
    assert f"{tmp_path}/config/nowhere.json" in err and f"{tmp_path.parent}/config/nowhere.json" in err


def test_kontext_flavour_trains_kontext_and_what_tuner_cannot_train_is_refused(tmp_path, capsys):
    """model_flavour=kontext is FLUX.1 Kontext with its reference images; controlnet, control and a flavour tuner
    would train as another model exit 2 with one line, and write nothing (issue 24)."""
    out, text, err = _import(tmp_path, capsys, DATA / "kontext.json")
    assert "- override /preset: flux-kontext" in text
    cfg = _compose(tmp_path, "kontext")
    assert (cfg.model.family, cfg.model.pretrained_model_name_or_path) == (
        "flux_kontext",
        "black-forest-labs/FLUX.1-Kontext-dev",
    )
    assert list(cfg.data.datasets) == ["edits"] and cfg.data.cache_dir == "cache/vae/flux/kontext/edits"
    assert cfg.data.datasets.edits.conditioning.reference.path == "datasets/references"
    base = json.loads((DATA / "kontext.json").read_text())
    refused = {
        "controlnet": ({"controlnet": True}, "controlnet=True: tuner trains no ControlNet"),
        "control": ({"control": "true"}, "flux-control preset"),
        "libreflux": ({"model_flavour": "libreflux"}, "model_flavour='libreflux' (flux): LibreFlux"),
        "made-up": ({"model_flavour": "made-up"}, "not a flux flavour tuner trains; its are: dev, kontext, krea"),
        "i2v": ({"model_family": "wan", "model_flavour": "i2v-14b-2.1"}, "tuner trains Wan text-to-video"),
    }
    for name, (change, line) in refused.items():
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps(base | change))
        assert importer.main(["simpletuner", str(config), "-o", str(tmp_path / f"{name}.yaml")]) == 2, name
        assert line in capsys.readouterr().err and not (tmp_path / f"{name}.yaml").exists(), name


def test_wan22_flavours_and_the_refiner_keys(tmp_path):
    """Wan 2.2: ti2v-5b-2.2 is the wan22-5b preset; the T2V A14B by its path is wan22-a14b (both experts), and
    SimpleTuner's refiner keys train one expert of it (issue 24). (Mapping only: Wan's check reads its VAE config.)"""
    from tuner.interop.simpletuner import convert

    config = tmp_path / "ti2v.json"
    config.write_text(json.dumps({"model_family": "wan", "model_flavour": "ti2v-5b-2.2", "model_type": "lora"}))
    res = convert(config)
    assert res.defaults["preset"] == "wan22-5b"
    assert res.get("model.pretrained_model_name_or_path") == "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    res = convert(DATA / "wan22_a14b.json")
    assert res.defaults["preset"] == "wan22-a14b" and res.get("model.expert") is None
    assert res.defaults["quantization"] == "int8-quanto" and res.get("checkpointing_steps") == 100
    one = tmp_path / "wan22_high.json"
    settings = json.loads((DATA / "wan22_a14b.json").read_text())
    one.write_text(json.dumps(settings | {"refiner_training": True, "refiner_training_invert_schedule": True}))
    res = convert(one)
    assert res.defaults["preset"] == "wan22-a14b" and res.get("model.expert") == "high_noise"
    assert "experts" in res.values["model"] and res.get("model.experts") is None  # one expert, not the preset's two


def test_a_huggingface_backend_keeps_its_settings_and_says_what_to_download(tmp_path, capsys):
    """type huggingface: tuner streams no Hub dataset; the backend becomes a folder to download it into, with its
    resolution, crop and repeats, and the note gives the command (issue 24)."""
    backend = DATA / "hub_backend.json"
    out, text, err = _import(tmp_path, capsys, DATA / "sd3_lora.json", "--backend", str(backend))
    assert "`hf download someone/photo-captions --repo-type dataset --local-dir datasets/pseudo-camera`" in err
    cfg = _compose(tmp_path, "sd3_lora")
    hub = cfg.data.datasets["pseudo-camera"]
    assert (hub.path, hub.image_column, hub.caption_column) == ("datasets/pseudo-camera", "image", "caption")
    assert (hub.resolution, hub.resolution_type, hub.crop, hub.crop_style, hub.repeats) == (768, "area", True, "random", 3)
    assert "caption_strategy" not in err and "metadata_backend" not in err


def test_the_webuis_saved_config_and_dataloader_are_read(tmp_path, capsys):
    """The WebUI saves {"_metadata", "config": {...}} (a nested "config" under its own keys) and wraps datasets as
    {"datasets": [...]} (issue 24)."""
    out, text, err = _import(tmp_path, capsys, DATA / "webui" / "default.json")
    assert "_metadata" not in err
    cfg = _compose(tmp_path, "default")
    assert cfg.model.family == "sdxl" and cfg.model.lora.rank == 8  # the config's own key over its nested one
    assert (cfg.checkpointing_steps, cfg.data.batch_size, cfg.max_train_steps) == (100, 2, 200)
    assert list(cfg.data.datasets) == ["cats"] and cfg.data.datasets.cats.repeats == 2
    assert cfg.data.cache_dir == "cache/vae/sdxl/cats"


def test_no_flavour_and_no_path_is_simpletuners_default_flavour(tmp_path):
    """SimpleTuner trains its DEFAULT_MODEL_FLAVOUR when a config names neither: Flux's is krea (issue 24)."""
    from tuner.interop.simpletuner import convert

    for family, preset, repo in (
        ("flux", "flux-dev", "black-forest-labs/FLUX.1-Krea-dev"),
        ("sdxl", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
        ("flux2", "flux2-klein", "black-forest-labs/FLUX.2-klein-base-9B"),
    ):
        config = tmp_path / f"{family}.json"
        config.write_text(json.dumps({"model_family": family, "model_type": "lora"}))
        res = convert(config)
        assert (res.defaults["preset"], res.get("model.pretrained_model_name_or_path")) == (preset, repo), family


def test_text_encoder_training_and_dora_carry_over(tmp_path, capsys):
    """train_text_encoder: a LoRA on every text encoder the family's pipeline loads one into, at text_encoder_lr;
    use_dora: model.lora.use_dora. A family whose pipeline loads no encoder LoRA reports the key instead."""
    from tuner.interop.simpletuner import convert

    config = tmp_path / "sdxl_te.json"
    settings = {"model_family": "sdxl", "model_type": "lora", "train_text_encoder": True, "text_encoder_lr": 5e-5}
    config.write_text(json.dumps(settings | {"use_dora": True}))
    res = convert(config)
    assert res.get("model.lora.text_encoders") == ["text_encoder", "text_encoder_2"]
    assert res.get("model.lora.text_encoder_lr") == 5e-5 and res.get("model.lora.use_dora") is True
    config.write_text(json.dumps(settings | {"model_family": "pixart_sigma"}))
    res = convert(config)
    assert res.get("model.lora.text_encoders") is None
    assert [k for k, _ in res.unmapped] == ["train_text_encoder"]
    config.write_text(json.dumps(settings | {"train_text_encoder": False}))
    res = convert(config)
    assert res.get("model.lora.text_encoder_lr") is None and "text_encoder_lr" in dict(res.unmapped)
