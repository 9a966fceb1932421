"""LoRA variants users of the other trainers reach for: DoRA (``model.lora.use_dora``, through peft) and LoRA+
(``model.lora.plus_ratio``: the B matrices in a parameter group of their own at ``lr x ratio``)."""

import pytest
import torch
from safetensors.torch import load_file

from tuner.config import ConfigError
from tuner.run import build_module, prepare, train

LR = 1e-3


def _optimizer(module):
    """The optimiser (and its schedule) the module configures, as Lightning builds them."""
    built = module.build_optimizer(10)
    return (built["optimizer"], built["lr_scheduler"]["scheduler"]) if isinstance(built, dict) else (built, None)


def test_lora_plus_gives_the_b_matrices_their_own_rate(make_cfg, tmp_path):
    cfg = prepare(make_cfg("model.lora.plus_ratio=16", f"optimizer.lr={LR}", "lr_scheduler=constant_with_warmup",
                           "lr_scheduler.warmup_steps=2", output_dir=tmp_path))
    module = build_module(cfg)
    optimizer, scheduler = _optimizer(module)
    names = {id(p): n for n, p in module.named_parameters()}
    rest, ups = optimizer.param_groups
    assert ups["params"] and all(".lora_B." in names[id(p)] for p in ups["params"])
    assert rest["params"] and not any(".lora_B." in names[id(p)] for p in rest["params"])
    assert len(rest["params"]) + len(ups["params"]) == sum(p.requires_grad for p in module.parameters())
    assert scheduler.base_lrs == pytest.approx([LR, 16 * LR])  # the warm-up ramps each group to its own rate
    plain = build_module(prepare(make_cfg(f"optimizer.lr={LR}", output_dir=tmp_path / "plain")))
    assert len(_optimizer(plain)[0].param_groups) == 1  # off by default: one group, as before


def test_a_lora_plus_run_resumes_exactly_and_keeps_its_rates(make_cfg, tmp_path):
    common = ("model.lora.plus_ratio=16", f"optimizer.lr={LR}", "checkpointing_steps=2")
    train(make_cfg(*common, "max_train_steps=4", output_dir=tmp_path / "straight"))
    train(make_cfg(*common, "max_train_steps=2", output_dir=tmp_path / "resumed"))
    train(make_cfg(*common, "max_train_steps=4", "resume_from_checkpoint=latest", output_dir=tmp_path / "resumed"))
    a, b = (load_file(tmp_path / run / "pytorch_lora_weights.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(next((tmp_path / "resumed" / "checkpoints").rglob("*.ckpt")), weights_only=False)
    groups = state["optimizer_states"][0]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([LR, 16 * LR])


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_dora_trains_its_magnitudes_exports_them_and_resumes_exactly(family, make_cfg, demo_dir, tmp_path):
    from diffusers import DiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    common = (f"model={family}", "model.lora.use_dora=true", "optimizer.lr=1e-2", "checkpointing_steps=2")
    train(make_cfg(*common, "max_train_steps=4", output_dir=tmp_path / "straight"))
    train(make_cfg(*common, "max_train_steps=2", output_dir=tmp_path / "resumed"))
    train(make_cfg(*common, "max_train_steps=4", "resume_from_checkpoint=latest", output_dir=tmp_path / "resumed"))
    a, b = (load_file(tmp_path / run / "pytorch_lora_weights.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    magnitudes = {k: v for k, v in a.items() if "lora_magnitude_vector" in k}
    assert magnitudes, "the export holds no DoRA magnitudes"

    pipe = DiffusionPipeline.from_pretrained(demo_dir / family)
    pipe.load_lora_weights(tmp_path / "straight")  # diffusers' own loader reads the magnitudes
    denoiser = pipe.unet if family == "sd15" else pipe.transformer
    loaded = get_peft_model_state_dict(denoiser, adapter_name=denoiser.active_adapters()[0])
    got = {k: v for k, v in loaded.items() if "lora_magnitude_vector" in k}
    assert len(got) == len(magnitudes)
    prefix = "unet." if family == "sd15" else "transformer."
    for key, value in magnitudes.items():
        assert torch.equal(got[key.removeprefix(prefix)], value), key


def test_lora_shapes_need_a_lora(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="model.lora.use_dora shapes a LoRA, and model.finetune=full"):
        prepare(make_cfg("model.lora.use_dora=true", "model.finetune=full", output_dir=tmp_path))
    with pytest.raises(ConfigError, match="model.lora.plus_ratio=0"):
        prepare(make_cfg("model.lora.plus_ratio=0", output_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"export.lora_formats=\[kohya\] with model.lora.use_dora"):
        prepare(make_cfg("model.lora.use_dora=true", "export.lora_formats=[diffusers,kohya]", output_dir=tmp_path))
