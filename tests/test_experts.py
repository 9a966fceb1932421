"""The seed's mixture-of-experts split schedule, one expert per run: each trains (and measures its
validation loss) on its own side of model.expert_boundary, for DDPM and flow families alike."""

import math

import pytest
import torch

from tuner.config import ConfigError
from tuner.run import build_module, prepare, train


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize(("expert", "t_range", "levels"), [("low_noise", (0, 350), [0.1, 0.3]), ("high_noise", (350, 1000), [0.5, 0.7, 0.9])])
def test_a_ddpm_expert_trains_its_side_of_the_boundary(family, expert, t_range, levels, make_cfg, tmp_path):
    cfg = prepare(make_cfg(f"model={family}", f"model.expert={expert}", "model.expert_boundary=0.35", output_dir=tmp_path))
    assert list(cfg.callbacks.validation.loss_levels) == levels  # val/loss on its own range too
    module = build_module(cfg, with_optimizer=False)
    assert (module.noise.min_t, module.noise.max_t) == t_range
    t = module.noise.sample(2000, torch.Generator().manual_seed(0))
    assert t_range[0] <= int(t.min()) and int(t.max()) < t_range[1]


@pytest.mark.parametrize(("expert", "s_range", "levels"), [("low_noise", (0.0, 0.6), [0.1, 0.3, 0.5]), ("high_noise", (0.6, 1.0), [0.7, 0.9])])
def test_a_flow_expert_samples_sigmas_on_its_side(expert, s_range, levels, make_cfg, tmp_path):
    cfg = prepare(make_cfg("model=sd3", f"model.expert={expert}", "model.expert_boundary=0.6", output_dir=tmp_path))
    module = build_module(cfg, with_optimizer=False)
    sigmas = module.noise.sigmas(module.noise.sample(2000, torch.Generator().manual_seed(0)))
    assert float(sigmas.min()) >= s_range[0] and float(sigmas.max()) <= s_range[1]
    assert list(cfg.callbacks.validation.loss_levels) == levels


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.expert=low_noise", "model.expert_boundary=1.5"], "model.expert_boundary=1.5; valid: between 0 and 1"),
        (["model.expert=low_noise", "model.min_timestep=100"], "give the range as noise levels only"),
        (["model.expert=low_noise", "model.min_noise_level=0.5"], "leaves no noise range"),
    ],
)
def test_impossible_expert_settings_fail_before_loading(overrides, message, make_cfg):
    with pytest.raises(ConfigError) as err:
        prepare(make_cfg(*overrides, "model.pretrained_model_name_or_path=/nonexistent"))
    assert message in str(err.value)


def test_an_unknown_expert_names_the_valid_ones(make_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("model.expert=middle")
    assert "high_noise" in str(err.value.__cause__) and "low_noise" in str(err.value.__cause__)


def test_an_expert_run_end_to_end(make_cfg, tmp_path):
    loss = train(make_cfg("model.expert=high_noise", "max_train_steps=2", output_dir=tmp_path))
    assert loss is not None and math.isfinite(loss)


# ---- both experts sharing one sampling loop -------------------------------------------------------------
def _two_lora(make_cfg, tmp_path, family, *overrides):
    from tuner.run import build_datamodule

    cfg = prepare(make_cfg(f"model={family}", "model.experts=two_lora", *overrides, output_dir=tmp_path))
    module = build_module(cfg, with_optimizer=False)
    (batch,) = build_datamodule(cfg, tmp_path).fixed_batches(1)
    return module, batch


def _lora_params(module, adapter):
    return {n: p for n, p in module.denoiser.named_parameters() if f".{adapter}." in n}


def _adapter_calls(module):
    """A hook on one LoRA layer of the denoiser: the adapter each denoiser call actually ran."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next(m for m in module.denoiser.modules() if isinstance(m, BaseTunerLayer))
    calls = []
    return calls, layer.register_forward_pre_hook(lambda m, a: calls.append(tuple(m.active_adapters)))


# (Flux's shifted schedule puts ~4% of its draws below 0.35: a higher boundary gives both experts steps here.)
@pytest.mark.parametrize(("family", "boundary"), [("sdxl", 0.35), ("flux", 0.7)])
def test_two_lora_trains_each_adapter_only_on_its_range(family, boundary, make_cfg, tmp_path):
    from models.experts import owner

    module, batch = _two_lora(make_cfg, tmp_path, family, f"model.expert_boundary={boundary}")
    share = module.experts.low_noise_share()
    assert 0 < share < 1
    assert module.lora_adapters() == [("high_noise", "_high_noise"), ("low_noise", "_low_noise")]
    both = {**_lora_params(module, "high_noise"), **_lora_params(module, "low_noise")}
    assert both and all(p.requires_grad for p in both.values())  # both experts train, both are checkpointed
    assert {f"{module.denoiser_name}.{n}" for n in both} <= set(module.trainable_state_dict())
    drawn = []
    for batch_idx in range(12):
        module.experts.begin_step(batch_idx)
        calls, hook = _adapter_calls(module)
        module.zero_grad(set_to_none=True)
        module.compute_loss(batch, torch.Generator().manual_seed(batch_idx)).backward()
        hook.remove()
        expert = module.experts.step_expert  # chosen when the loss sampled, at the batch's shift
        drawn.append(expert)
        timesteps = module.experts.schedules[expert].sample(500, torch.Generator().manual_seed(batch_idx))
        levels = timesteps.double() / module.noise.num_timesteps  # DDPM t / T, flow sigma alike
        assert {owner(float(v), boundary) for v in levels} == {expert}  # its timesteps stay in its range
        assert calls and all(c == (expert,) for c in calls)  # only its adapter ran
        idle = "low_noise" if expert == "high_noise" else "high_noise"
        assert all(p.grad is not None for p in _lora_params(module, expert).values())
        assert all(p.grad is None for p in _lora_params(module, idle).values())  # the other: untouched
        averaged = module.parameters_to_average(list(module.trainable_state_dict()))  # its EMA shadow alone moves
        assert len(averaged) == len(_lora_params(module, expert)) and all(f".{expert}." in n for n in averaged)
    assert set(drawn) == {"high_noise", "low_noise"}


def test_two_lora_draws_its_expert_at_the_batchs_shift(make_cfg, tmp_path):
    """Flux dev shifts by the image's size: the step's expert and each expert's share follow the batch's
    shift, not the config's static one, and match the whole schedule's mass below the boundary there."""
    module, _ = _two_lora(make_cfg, tmp_path, "flux", "model.expert_boundary=0.7")
    experts, noise = module.experts, module.noise
    dynamic = module.flow_shift_for(torch.zeros(1, 16, 8, 8))  # a 64 px image: 16 tokens, mu ~0.46
    assert abs(dynamic - noise.shift) > 1
    shares = {}
    for shift in (None, dynamic):
        draws = noise.sigmas(noise.sample(200_000, torch.Generator().manual_seed(1), shift))
        shares[shift] = experts.low_noise_share(shift)
        assert abs(shares[shift] - float((draws < 0.7).double().mean())) < 0.005
    assert shares[dynamic] - shares[None] > 0.15
    steps, low = 2000, 0
    for batch_idx in range(steps):
        experts.begin_step(batch_idx)
        experts.schedule_for(None).sample(1, torch.Generator().manual_seed(batch_idx), dynamic)
        low += experts.step_expert == "low_noise"
    sd = (shares[dynamic] * (1 - shares[dynamic]) / steps) ** 0.5
    assert abs(low / steps - shares[dynamic]) < 4 * sd  # the static share is > 10 sd away
    chosen = []
    for _ in range(2):  # the same step draws the same expert, whatever the global generator holds
        torch.rand(3)
        experts.begin_step(7)
        experts.schedule_for(None).sample(1, torch.Generator().manual_seed(7), dynamic)
        chosen.append(experts.step_expert)
    assert chosen[0] == chosen[1]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_two_lora_sampling_switches_at_the_boundary(family, make_cfg, tmp_path):
    from models.experts import owner

    module, _ = _two_lora(make_cfg, tmp_path, family)
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    calls, hook = _adapter_calls(module)
    with module.sampling_context():
        module.sample_image(pipe, "a red circle", num_inference_steps=8, height=64, width=64, guidance_scale=1.0)
    hook.remove()
    served = module.experts.served
    assert len(served) == 8 and {e for _, e in served} == {"high_noise", "low_noise"}
    scale = module.denoiser_timestep_scale or module.noise.num_timesteps
    assert all(expert == owner(t / scale, 0.35) for t, expert in served)  # switched exactly at the boundary
    assert [c[0] for c in calls] == [e for _, e in served]  # and the adapter that ran is the one chosen
    order = [e for _, e in served]
    k = order.count("high_noise")
    assert order == ["high_noise"] * k + ["low_noise"] * (8 - k)  # high noise first, then one switch to low
    assert module.experts.switch.active == "high_noise"  # training's adapter is back


@pytest.mark.parametrize(("family", "boundary"), [("sdxl", 0.35), ("flux", 0.7)])
def test_two_lora_run_exports_both_experts_and_resumes_exactly(family, boundary, make_cfg, tmp_path):
    from safetensors.torch import load_file

    common = (f"model={family}", "model.experts=two_lora", f"model.expert_boundary={boundary}", "checkpointing_steps=3")
    common += ("callbacks.ema.enabled=true",)
    train(make_cfg(*common, "max_train_steps=6", output_dir=tmp_path / "straight"))
    train(make_cfg(*common, "max_train_steps=3", output_dir=tmp_path / "resumed"))
    train(make_cfg(*common, "max_train_steps=6", "resume_from_checkpoint=latest", output_dir=tmp_path / "resumed"))
    names = [f"pytorch_lora_weights_{e}{s}.safetensors" for e in ("high_noise", "low_noise") for s in ("", "_ema")]
    for name in names:
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not (tmp_path / "straight" / "pytorch_lora_weights.safetensors").exists()
    for expert in ("high_noise", "low_noise"):  # each expert trained: its up/B weights left their zero init
        state = load_file(tmp_path / "straight" / f"pytorch_lora_weights_{expert}.safetensors")
        ups = [v for k, v in state.items() if k.endswith((".lora.up.weight", ".lora_B.weight"))]
        assert ups and any(v.abs().sum() > 0 for v in ups), expert
    card = (tmp_path / "straight" / "README.md").read_text()
    assert 'adapter_name="high_noise"' in card and 'adapter_name="low_noise"' in card
    assert "register_forward_pre_hook(pick_expert" in card and f"boundary = {boundary}" in card


def test_the_card_snippet_samples_with_both_experts(make_cfg, demo_dir, tmp_path):
    """The model card's code, run as a user would on the exported files, switches adapters at the boundary."""
    import re


    train(make_cfg("model=sdxl", "model.experts=two_lora", "max_train_steps=2", output_dir=tmp_path))
    code = re.search(r"```python\n(.*?)```", (tmp_path / "README.md").read_text(), re.S).group(1)
    code = code.replace("torch_dtype=torch.bfloat16", "torch_dtype=torch.float32").replace('pipe.to("cuda")', "")
    code = code.replace(repr(str(demo_dir / "sdxl")), "BASE").split("image = pipe(")[0]
    scope = {"BASE": str(demo_dir / "sdxl")}
    exec(code.replace("'.'", repr(str(tmp_path))), scope)  # noqa: S102 - our own card's snippet
    pipe, seen = scope["pipe"], []
    pipe.unet.register_forward_pre_hook(lambda m, a, k: seen.append((int(a[1]), tuple(pipe.get_active_adapters()))), with_kwargs=True)
    pipe("a red circle", num_inference_steps=6, height=64, width=64, output_type="latent")
    assert {a for _, a in seen} == {("high_noise",), ("low_noise",)}
    assert all(a == (("low_noise",) if t < 350 else ("high_noise",)) for t, a in seen)


@pytest.mark.parametrize(("family", "partner_finetune"), [("sd15", "lora"), ("sd15", "full"), ("sdxl", "lora"), ("flux", "lora")])
def test_a_low_noise_expert_validates_through_the_whole_chain(family, partner_finetune, make_cfg, tmp_path):
    from PIL import Image

    train(make_cfg(f"model={family}", "model.expert=high_noise", f"model.finetune={partner_finetune}", "max_train_steps=2", "optimizer.lr=1e-2", "callbacks.validation.enabled=false", output_dir=tmp_path / "high"))
    partner = tmp_path / "high" / ("pipeline" if partner_finetune == "full" else "")
    low = (f"model={family}", "model.expert=low_noise", "max_train_steps=2", "callbacks.ema.enabled=false")
    train(make_cfg(*low, output_dir=tmp_path / "alone"))
    train(make_cfg(*low, f"model.expert_partner={partner}", output_dir=tmp_path / "chained"))
    assert f"expert partner ({partner_finetune}) loaded" in (tmp_path / "chained" / "train.log").read_text()
    for name in ("a_red_circle_on_white.png", "a_blue_square_on_white.png"):
        alone, chained = (Image.open(tmp_path / run / "validation" / "step_2" / name) for run in ("alone", "chained"))
        assert alone.size == chained.size and alone.tobytes() != chained.tobytes()  # the partner drew the early steps

    # in the module: the partner serves the high levels, this run's expert the low ones; the partner never trains
    module = build_module(prepare(make_cfg(*low, f"model.expert_partner={partner}", output_dir=tmp_path / "m")), with_optimizer=False)
    before = set(module.trainable_state_dict())
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    with module.sampling_context():
        module.sample_image(pipe, "a red circle", num_inference_steps=6, height=64, width=64)
    assert {e for _, e in module.experts.served} == {"high_noise", "low_noise"}
    assert set(module.trainable_state_dict()) == before  # the partner is not trained nor checkpointed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.experts=two_lora", "model.expert=low_noise"], "unset model.expert and model.expert_partner"),
        (["model.experts=two_lora", "model.finetune=full"], "needs model.finetune=lora"),
        (["model.experts=two_lora", "model.max_noise_level=0.3"], "inside the trained noise range"),
        (["model.expert_partner=/tmp"], "set model.expert=low_noise|high_noise too"),
        (["model.expert=low_noise", "model.expert_partner=/nonexistent/lora"], "no such file or folder"),
    ],
)
def test_impossible_two_expert_settings_fail_before_loading(overrides, message, make_cfg):
    with pytest.raises(ConfigError) as err:
        prepare(make_cfg(*overrides, "model.pretrained_model_name_or_path=/nonexistent"))
    assert message in str(err.value)


@pytest.mark.slow
def test_two_lora_under_ddp_trains_the_same_expert_on_both_ranks(demo_dir, tmp_path):
    """Two CPU processes: every step both ranks train the same expert (the other's adapter is unused on
    both, which DDP is told to expect), so the run completes and writes one file per expert."""
    from conftest import run_cli
    from safetensors.torch import load_file

    out = tmp_path / "ddp"
    result = run_cli(
        "train.py",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "model=sdxl",
        "model.experts=two_lora",
        f"output_dir={out}",
        f"demo_assets_dir={demo_dir}",
        "max_train_steps=4",
        "checkpointing_steps=4",
        "callbacks.validation.enabled=false",
        "trainer.enable_progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for expert in ("high_noise", "low_noise"):
        assert load_file(out / f"pytorch_lora_weights_{expert}.safetensors")
