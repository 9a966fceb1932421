"""Wan 2.2 A14B's two experts in one run (``model.experts=two_lora``): a LoRA on each of its transformers, the
step's expert's transformer the one that runs and trains, the checkpoint's ``boundary_ratio`` as the split; the
export WanPipeline loads (``load_into_transformer_2=True``), sampling through both, and an exact resume."""

import re

import pytest
import torch

from tuner.config.families import write_tiny
from tuner.run import build_datamodule, build_module, ensure_demo_assets, prepare, train

BOUNDARY = 0.875  # the tiny A14B's boundary_ratio (T2V-A14B's)
EXPERT_OF = {"transformer": "high_noise", "transformer_2": "low_noise"}


@pytest.fixture
def a14b(tmp_path):
    return write_tiny("wan22-a14b", tmp_path / "tiny" / "wan22-a14b")


def _calls(module):
    """Which transformer each denoiser call ran, and the timestep it was given."""
    calls, hooks = [], []
    for name in EXPERT_OF:
        hook = getattr(module, name).register_forward_pre_hook(
            lambda m, a, k, name=name: calls.append((name, float(k["timestep"].flatten()[0]))), with_kwargs=True
        )
        hooks.append(hook)
    return calls, hooks


def test_each_step_trains_its_experts_own_transformer_on_its_side_of_the_boundary(a14b, make_cfg, tmp_path):
    cfg = prepare(make_cfg("model=wan", f"model.pretrained_model_name_or_path={a14b}", "model.experts=two_lora",
                           output_dir=tmp_path / "out"))
    assert cfg.model.expert_boundary == BOUNDARY  # the checkpoint's, settled before anything loads
    ensure_demo_assets(cfg)  # the demo clips
    module = build_module(cfg, with_optimizer=False)
    (batch,) = build_datamodule(cfg, tmp_path / "out").fixed_batches(1)
    assert module.expert_denoisers() == {"high_noise": "transformer", "low_noise": "transformer_2"}
    assert module.lora_adapters() == [("high_noise", "_high_noise"), ("low_noise", "_low_noise")]
    for name, expert in EXPERT_OF.items():  # one adapter on each transformer, named after its expert
        assert list(getattr(module, name).peft_config) == [expert]
    trainable = module.trainable_state_dict()
    assert any(n.startswith("transformer_2.") for n in trainable) and any(n.startswith("transformer.") for n in trainable)
    assert not any(n.startswith("transformer.") and "low_noise" in n for n in trainable)
    drawn = set()
    for batch_idx in range(12):
        module.experts.begin_step(batch_idx)
        calls, hooks = _calls(module)
        module.zero_grad(set_to_none=True)
        module.compute_loss(batch, torch.Generator().manual_seed(batch_idx)).backward()
        for hook in hooks:
            hook.remove()
        expert = module.experts.step_expert
        drawn.add(expert)
        ran = {name for name, _ in calls}
        assert ran == {module.expert_denoisers()[expert]}  # only its transformer ran
        for _, t in calls:
            assert (t < BOUNDARY * 1000) == (expert == "low_noise")
        for name, owner in EXPERT_OF.items():
            grads = [p.grad for n, p in getattr(module, name).named_parameters() if p.requires_grad]
            assert grads and all((g is not None) == (owner == expert) for g in grads), (name, expert)
        averaged = module.parameters_to_average(list(trainable))  # the EMA moves the trained expert's alone
        assert averaged and all(f".{expert}." in n for n in averaged)
    assert drawn == {"high_noise", "low_noise"}


def test_a_two_expert_run_exports_what_wanpipeline_loads_and_resumes_exactly(a14b, make_cfg, tmp_path):
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    common = ("model=wan", f"model.pretrained_model_name_or_path={a14b}", "model.experts=two_lora", "checkpointing_steps=2")
    train(make_cfg(*common, "max_train_steps=4", output_dir=tmp_path / "straight"))
    train(make_cfg(*common, "max_train_steps=2", output_dir=tmp_path / "resumed"))
    train(make_cfg(*common, "max_train_steps=4", "resume_from_checkpoint=latest", output_dir=tmp_path / "resumed"))
    files = {e: f"pytorch_lora_weights_{e}.safetensors" for e in ("high_noise", "low_noise")}
    for name in files.values():
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    card = (tmp_path / "straight" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "load_into_transformer_2=True" in code and "register_forward_pre_hook" not in code
    pipe = WanPipeline.from_pretrained(a14b)
    pipe.set_progress_bar_config(disable=True)
    loads = [line for line in code.splitlines() if line.startswith("pipe.load_lora_weights(")]
    assert len(loads) == 2
    for line in loads:  # the card's own lines, on the run's folder
        exec(line.replace("'.'", repr(str(tmp_path / "straight"))), {"pipe": pipe})  # noqa: S102 - our own card
    for name, expert in EXPERT_OF.items():
        saved = load_file(tmp_path / "straight" / files[expert])
        loaded = get_peft_model_state_dict(getattr(pipe, name), adapter_name=getattr(pipe, name).active_adapters()[0])
        assert len(loaded) == len(saved) > 0
        for key, value in saved.items():  # each file went into its own transformer, weight for weight
            assert torch.equal(loaded[key.removeprefix("transformer.")], value), (name, key)
    calls, _ = _calls(pipe)
    pipe("a red circle", num_frames=5, height=64, width=64, num_inference_steps=6, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    assert {name for name, _ in calls} == set(EXPERT_OF)  # the pipeline switched experts at its boundary
    assert all((t >= BOUNDARY * 1000) == (name == "transformer") for name, t in calls)


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_a_full_fine_tune_of_one_expert_exports_it_into_its_own_transformer(expert, a14b, make_cfg, tmp_path):
    """``model.expert=low_noise`` trains ``transformer_2``: the exported A14B pipeline has it there, the other expert
    as the base has it, and the boundary kept, so a second run can train the other expert on top."""
    from diffusers import WanPipeline

    train(make_cfg("model=wan", f"model.pretrained_model_name_or_path={a14b}", "model.finetune=full",
                   f"model.expert={expert}", "optimizer.lr=1e-3", "max_train_steps=2", "callbacks.validation.enabled=false",
                   output_dir=tmp_path / "out"))
    base, out = WanPipeline.from_pretrained(a14b), WanPipeline.from_pretrained(tmp_path / "out" / "pipeline")
    assert out.config.boundary_ratio == BOUNDARY
    for name, owner in EXPERT_OF.items():
        theirs, ours = getattr(base, name).state_dict(), getattr(out, name).state_dict()
        changed = any(not torch.equal(ours[k], theirs[k]) for k in theirs)
        assert changed == (owner == expert), name
