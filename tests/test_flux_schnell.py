"""Flux schnell's training adapter (models/training_adapter.py): a de-distilling LoRA active while the tiny schnell
transformer trains, off while validation samples, and in none of the LoRA file, the checkpoint or a resume's
weights; checked before any weight loads; the warning and the model card for schnell without one."""

import json
import logging

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from models.flux import FluxModule
from tuner.run import build_module, prepare, train

ADAPTER_TARGETS = ["to_q", "to_k", "proj_mlp"]  # to_q/to_k: layers the run's LoRA also wraps; proj_mlp: one it does not


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    """The tiny schnell pipeline, and a training adapter for it (rank 2, alpha 4, nonzero weights) in diffusers'
    Flux LoRA format, as ``FluxPipeline.save_lora_weights`` writes it."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from tuner.config.families import write_tiny

    root = tmp_path_factory.mktemp("schnell")
    path = write_tiny("flux-schnell", root / "pipeline")
    transformer = FluxPipeline.from_pretrained(path).transformer
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=ADAPTER_TARGETS), adapter_name="adapter")
    torch.manual_seed(1)
    for name, p in transformer.named_parameters():
        if ".adapter." in name:
            p.data.normal_(0.0, 0.3)  # lora_B starts at zero: give it weights that change the output
    FluxPipeline.save_lora_weights(
        root / "adapter",
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="adapter"),
        transformer_lora_adapter_metadata=transformer.peft_config["adapter"].to_dict(),
        weight_name="pytorch_lora_weights.safetensors",
    )
    return path, root / "adapter" / "pytorch_lora_weights.safetensors"


def _schnell_cfg(make_cfg, schnell, out, *overrides):
    path, tokens = f"model.pretrained_model_name_or_path={schnell[0]}", "model.options.t5_max_length=256"
    return make_cfg("model=flux", path, tokens, "callbacks.ema.enabled=false", *overrides, output_dir=out)


def _module(make_cfg, schnell, out, *overrides):
    return build_module(prepare(_schnell_cfg(make_cfg, schnell, out, *overrides)), with_optimizer=False)


def test_the_adapter_is_on_while_training_and_off_while_sampling(make_cfg, schnell, tmp_path):
    adapted = _module(make_cfg, schnell, tmp_path / "a", f"model.options.training_adapter={schnell[1]}")
    plain = _module(make_cfg, schnell, tmp_path / "b")
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in plain.named_parameters() if p.requires_grad]  # the adapter trains nothing
    assert not any("training_adapter" in n for n in trainable) and ".default." in trainable[0]
    assert set(adapted.trainable_state_dict()) == set(plain.trainable_state_dict())
    x, t, cond = torch.randn(1, 16, 8, 8), torch.tensor([500.0]), plain.encode_prompts(["a red circle"])
    with torch.no_grad():
        base = plain.denoise(x, t, cond, {})  # the run's LoRA starts as a no-op (lora_B = 0): this is schnell
        trained = adapted.denoise(x, t, cond, {})
        with adapted.sampling_context():  # what validation samples with
            sampled = adapted.denoise(x, t, cond, {})
        again = adapted.denoise(x, t, cond, {})
    assert (trained - base).abs().max() > 1e-3  # training sees the adapter
    assert torch.equal(sampled, base)  # sampling is plain schnell (+ the run's LoRA), exactly
    assert torch.equal(again, trained)  # and the adapter is back on for the next step
    assert [n for n, p in adapted.named_parameters() if p.requires_grad] == trainable


class AdapterProbe(L.Callback):
    """Records, for each call of the transformer, whether it came from FluxPipeline (which passes
    ``joint_attention_kwargs``; the training step does not) and which adapters its LoRA layers ran."""

    def __init__(self, path: str):
        self.path, self.calls = path, []

    def on_train_start(self, trainer, pl_module) -> None:
        layer = pl_module.transformer.transformer_blocks[0].attn.to_q  # the run's LoRA and the adapter both wrap it

        def record(module, args, kwargs):
            self.calls.append(["joint_attention_kwargs" in kwargs, sorted(layer.active_adapters)])

        pl_module.transformer.register_forward_pre_hook(record, with_kwargs=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        with open(self.path, "w") as f:
            json.dump(self.calls, f)


def test_a_run_exports_and_checkpoints_only_its_own_lora_and_resumes_bit_exactly(make_cfg, schnell, tmp_path):
    from conftest import generate
    from diffusers import FluxPipeline

    adapter = load_file(schnell[1])
    out, calls = tmp_path / "straight", tmp_path / "calls.json"
    common = (f"model.options.training_adapter={schnell[1]}", "checkpointing_steps=2",
              "callbacks.validation.every_n_steps=2", "callbacks.validation.num_inference_steps=2")  # fmt: skip
    probe = ("+callbacks.extra.probe._target_=test_flux_schnell.AdapterProbe", f"+callbacks.extra.probe.path={calls}")
    train(_schnell_cfg(make_cfg, schnell, out, *common, *probe, "max_train_steps=3"))

    # Training ran the adapter beside the run's LoRA; validation sampled through FluxPipeline without it.
    seen = json.loads(calls.read_text())
    assert {tuple(a) for pipe, a in seen if not pipe} == {("default", "training_adapter")}
    assert {tuple(a) for pipe, a in seen if pipe} == {("default",)}

    # The exported LoRA is the run's own: its rank (4) and layers, none of the adapter's keys or values.
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["transformer.r"] == 4 and "proj_mlp" not in config["transformer.target_modules"]
    assert lora and all(k.startswith("transformer.") and ".lora_" in k for k in lora)
    assert not any("proj_mlp" in k or "training_adapter" in k for k in lora)
    assert {v.shape[0] for k, v in lora.items() if "lora_A" in k} == {4}
    assert not any(torch.equal(v, a.to(v.dtype)) for v in lora.values() for a in adapter.values() if a.shape == v.shape)

    # ... and it loads onto the plain schnell pipeline, as the card says, and samples.
    pipe = FluxPipeline.from_pretrained(schnell[0])
    pipe.load_lora_weights(out)
    assert list(pipe.transformer.peft_config) == ["default_0"] and pipe.transformer.peft_config["default_0"].r == 4
    pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(torch.as_tensor(generate(pipe))).all()

    # The checkpoint holds the trainable LoRA only, and records which adapter (by content) trained it.
    ckpt = torch.load(out / "checkpoints" / "2" / "checkpoint.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all(".default." in k for k in ckpt["state_dict"])
    assert ckpt["tuner_model"]["training_adapter"].startswith("sha256:")

    card = (out / "README.md").read_text()
    assert "training adapter" in card and str(schnell[1]) in card and "plain FLUX.1 [schnell]" in card

    # A resume from step 2 loads the adapter again and reaches step 3's weights bit for bit.
    resumed = tmp_path / "resumed"
    train(_schnell_cfg(make_cfg, schnell, resumed, *common, "max_train_steps=3",
                       f"resume_from_checkpoint={out / 'checkpoints' / '2'}"))  # fmt: skip
    again = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert again.keys() == lora.keys() and all(torch.equal(again[k], lora[k]) for k in lora)


def test_a_resume_without_the_adapter_is_refused(make_cfg, schnell, tmp_path):
    out = tmp_path / "out"
    train(_schnell_cfg(make_cfg, schnell, out, f"model.options.training_adapter={schnell[1]}", "max_train_steps=1",
                       "callbacks.validation.enabled=false"))  # fmt: skip
    with pytest.raises(ValueError, match="trained with model.options.training_adapter sha256:"):
        train(_schnell_cfg(make_cfg, schnell, out, "max_train_steps=2", "resume_from_checkpoint=latest",
                           "callbacks.validation.enabled=false"))  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "extra", "message"),
    [
        ("{tmp}/missing.safetensors", (), "no such file or folder"),
        ("{tmp}", (), "the folder holds 0 .safetensors files"),
        ("{tmp}/weights.bin", (), "not a .safetensors file"),
        ("{adapter}", ("model.finetune=full",), "is for LoRA and LyCORIS runs"),
        ("{adapter}", ("model.experts=two_lora",), "cannot be combined with model.experts"),
    ],
)
def test_a_bad_adapter_fails_before_any_weight_loads(spec, extra, message, make_cfg, schnell, tmp_path, monkeypatch):
    from diffusers import FluxTransformer2DModel

    (tmp_path / "weights.bin").write_bytes(b"not weights")
    loaded = []
    real = FluxTransformer2DModel.from_pretrained.__func__
    monkeypatch.setattr(
        FluxTransformer2DModel, "from_pretrained", classmethod(lambda *a, **k: loaded.append(1) or real(*a, **k))
    )
    spec = spec.format(tmp=tmp_path, adapter=schnell[1])
    with pytest.raises(Exception, match=f"model.options.training_adapter.*{message}") as err:
        train(_schnell_cfg(make_cfg, schnell, tmp_path / "out", f"model.options.training_adapter={spec}", *extra))
    assert not loaded, "the transformer loaded before the adapter was checked"
    assert len(str(err.value.__cause__ or err.value).splitlines()) == 1
    # a config error (train.py prints it as one line, no traceback), found before the data scan
    from tuner.config import ConfigError

    assert isinstance(err.value, ConfigError), type(err.value)
    assert not (tmp_path / "out" / "dataset_report.json").exists()


def test_schnell_without_an_adapter_warns_once_and_the_card_says_what_users_will_see(
    make_cfg, schnell, demo_dir, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="models.flux"):
        _module(make_cfg, schnell, tmp_path / "a")
    warned = [r.getMessage() for r in caplog.records if r.name == "models.flux"]
    assert len(warned) == 1 and "undo the distillation" in warned[0] and "model.options.training_adapter" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.flux"):
        _module(make_cfg, schnell, tmp_path / "b", f"model.options.training_adapter={schnell[1]}")
    assert not [r for r in caplog.records if r.name == "models.flux"]

    def notes(*overrides):
        return FluxModule.card_notes(
            OmegaConf.create(prepare(_schnell_cfg(make_cfg, schnell, tmp_path / "c", *overrides)).model)
        )

    assert "model.options.training_adapter" in notes()[0] and "blurry" in notes()[0]
    assert "not part of these weights" in notes(f"model.options.training_adapter={schnell[1]}")[0]
    assert notes(f"model.pretrained_model_name_or_path={demo_dir / 'flux'}") == []  # dev: not step-distilled


@pytest.mark.parametrize(
    ("extra", "adapter"),
    [({}, "ostris/FLUX.1-schnell-training-adapter"), ({"disable_assistant_lora": "true"}, None),
     ({"assistant_lora_path": "adapters/mine.safetensors"}, "adapters/mine.safetensors")],
)  # fmt: skip
def test_simpletuner_schnell_imports_its_assistant_lora_as_the_training_adapter(extra, adapter, tmp_path):
    from tuner.interop.simpletuner import convert

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_family": "flux", "model_flavour": "schnell", "model_type": "lora", **extra}))
    res = convert(config)
    assert res.defaults["preset"] == "flux-schnell"
    assert res.values["model"]["options"]["training_adapter"] == adapter
