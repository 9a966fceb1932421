"""trainer=fsdp: the denoiser sharded across ranks with FSDP2 over the family's blocks (tuner/runtime/scale.py).

In this process: the config builds the intended strategy, every family's declared blocks exist in its real
denoiser, and what sharding cannot do is refused before any weight loads. Then one ``torchrun`` launch of
two gloo processes runs several real trainings (``tuner.run.train``, tiny pipelines) that the tests below
read: SD 1.5 LoRA + EMA straight, the same stopped and resumed from ``latest``, the same under DDP; a Flux
full fine-tune with gradient checkpointing beside the same under DDP; and one in bf16 with one-file
checkpoints, straight and resumed.

Run as a script, this file is that worker (``python -m torch.distributed.run ... tests/test_fsdp.py``).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "callbacks.validation.enabled=false"]
FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", *QUIET]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *QUIET]
# (output folder, overrides) of each training the worker runs, in order. max_grad_norm is small so that
# clipping acts on every step (a norm of one rank's shard would show). Sharded and DDP runs are compared in
# fp32: in bf16 the same math on differently laid-out memory rounds differently (CPU kernels).
SD = ["model=sd15", "checkpointing_steps=2", "max_grad_norm=0.01", "logger=csv"]
FLUX = ["model=flux", "model.finetune=full", "model.gradient_checkpointing=true", "checkpointing_steps=2"]
FLUX_BF16 = [*FLUX, "mixed_precision=bf16", "trainer.strategy.state_dict_type=full", "logger=none"]
RUNS = [
    ("sd_straight", [*FSDP, *SD, "max_train_steps=4"]),
    ("sd_resumed", [*FSDP, *SD, "max_train_steps=2"]),
    ("sd_resumed", [*FSDP, *SD, "max_train_steps=4", "resume_from_checkpoint=latest"]),
    ("sd_ddp", [*DDP, *SD, "max_train_steps=4"]),
    ("flux_fp32", [*FSDP, *FLUX, "max_train_steps=2", "max_grad_norm=0.01", "logger=csv"]),
    ("flux_ddp", [*DDP, *FLUX, "max_train_steps=2", "max_grad_norm=0.01", "logger=csv"]),
    ("flux_straight", [*FSDP, *FLUX_BF16, "max_train_steps=3"]),
    ("flux_resumed", [*FSDP, *FLUX_BF16, "max_train_steps=2"]),
    ("flux_resumed", [*FSDP, *FLUX_BF16, "max_train_steps=3", "resume_from_checkpoint=latest"]),
]


# ---- in this process ------------------------------------------------------------------------------
def test_fsdp_config_builds_the_strategy_for_the_module(make_cfg):
    import lightning as L
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from lightning.pytorch.plugins.precision import MixedPrecision

    from tuner import run
    from tuner.runtime.scale import DenoiserFSDP, fsdp_strategy, is_fsdp

    cfg = run.prepare(make_cfg("trainer=fsdp", "mixed_precision=bf16", *QUIET))
    assert is_fsdp(cfg) and run._is_distributed(cfg)  # so a sweep (-m) refuses it, as it does DDP
    strategy = fsdp_strategy(cfg, run.build_module(cfg))
    assert isinstance(strategy, DenoiserFSDP)
    assert strategy.blocks == (BasicTransformerBlock, ResnetBlock2D)  # sd15's fsdp_blocks, resolved
    assert strategy.state_dict_type == "sharded" and strategy._save_distributed_checkpoint
    assert strategy.reshard_after_forward
    # mixed precision follows the run's: Lightning autocasts, the shards are gathered in bf16 and
    # gradients summed in fp32; the family's inputs are passed as they are
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, precision=run.PRECISION["bf16"])
    assert isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision_plugin.precision == "bf16-mixed"
    policy = strategy.mp_policy()
    assert (policy.param_dtype, policy.reduce_dtype, policy.cast_forward_inputs) == (
        torch.bfloat16,
        torch.float32,
        False,
    )
    fp32 = fsdp_strategy(cfg, run.build_module(run.prepare(make_cfg("trainer=fsdp", *QUIET))))
    L.Trainer(strategy=fp32, accelerator="cpu", devices=2, precision=run.PRECISION["no"])
    assert fp32.mp_policy().param_dtype is None


# Parts whose size does not shrink with a tiny model's width: Z-Image's timestep MLP is 1024 wide at any width
# (0.3 M parameters: 85% of the tiny transformer, 0.01% of the real one)
FIXED_SIZE = {"z_image": ("t_embedder",)}


def test_every_family_declares_blocks_its_denoiser_has(demo_dir):
    """Each family's ``fsdp_blocks`` name classes of its real (tiny) denoiser, and they hold most of it."""
    from models.base import resolve
    from tuner.config.families import families, family_class
    from tuner.runtime.scale import block_classes

    for family in families():
        cls = family_class(family)
        denoiser = resolve(cls.components[cls.denoiser_name]).from_pretrained(
            demo_dir / family, subfolder=cls.denoiser_name
        )
        blocks = block_classes(cls.fsdp_blocks, denoiser)
        assert {c.__name__ for c in blocks} == set(cls.fsdp_blocks), family
        inside = {id(p) for m in denoiser.modules() if type(m) in blocks for p in m.parameters()}
        counted = [(n, p) for n, p in denoiser.named_parameters() if n.split(".")[0] not in FIXED_SIZE.get(family, ())]
        share = sum(p.numel() for n, p in counted if id(p) in inside) / sum(p.numel() for _, p in counted)
        assert share > 0.5, (family, share)  # tiny models; a real one has nearly all its weights in blocks


@pytest.mark.parametrize(
    "override, key",
    [
        ("mixed_precision=fp16", "mixed_precision=fp16"),
        ("model.finetune=lycoris", "model.finetune=lycoris"),
        ("model.experts=two_lora", "model.experts"),
        ("quantization=int8-quanto", "quantization.base_model_precision"),
        ("callbacks.validation.enabled=true", "callbacks.validation.enabled"),
        ("trainer.strategy.state_dict_type=zip", "trainer.strategy.state_dict_type"),
    ],
)
def test_what_sharding_cannot_do_is_refused_before_load(make_cfg, override, key):
    from tuner.config import ConfigError
    from tuner.runtime.scale import check_sharding

    cfg = make_cfg("trainer=fsdp", "callbacks.validation.enabled=false", override)
    with pytest.raises(ConfigError, match=f"^trainer=fsdp: {key}"):
        check_sharding(cfg)
    check_sharding(make_cfg("trainer=fsdp", "callbacks.validation.enabled=false"))  # the default run passes


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_build_the_intended_strategy(make_cfg, stage):
    """DeepSpeed is configured here; Lightning runs it on CUDA GPUs only (its fit refuses a CPU)."""
    pytest.importorskip("deepspeed")
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from tuner.config import ConfigError
    from tuner.runtime.scale import check_sharding

    cfg = make_cfg(f"trainer=deepspeed_zero{stage}", "trainer.strategy.offload_optimizer=true")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DeepSpeedStrategy) and strategy.exclude_frozen_parameters
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage and zero["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in zero  # the weights stay on the GPU unless offload_parameters=true
    if stage == 3:  # its exports would be empty placeholders: refused before load
        with pytest.raises(ConfigError, match="^trainer=deepspeed_zero3: not supported yet"):
            check_sharding(cfg)
        return
    check_sharding(cfg)
    with pytest.raises(ConfigError, match="^resume_from_checkpoint under DeepSpeed"):
        check_sharding(make_cfg("trainer=deepspeed_zero2", "resume_from_checkpoint=latest"))


# ---- two processes ----------------------------------------------------------------------------------
# The runs (~45 s of a core) live for the session, not the module: a pytest-xdist worker may run these tests apart,
# with other modules between them. The group keeps them on one worker (see tests/conftest.py).
RUNS_GROUP = pytest.mark.xdist_group("fsdp-runs")


@pytest.fixture(scope="session")
def runs(demo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNER_LOG_LEVEL": "WARNING", "TORCH_SHOW_CPP_STACKTRACES": "1"}
    env.pop("TUNER_RUN_ID", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = subprocess.run(
        [*command, __file__, str(demo_dir), str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if result.returncode:
        # which training each rank was in, and every line that names a C++ abort or an error, before the tail
        # (a rank that aborts in C++ leaves no Python traceback of its own)
        lines = (result.stdout + result.stderr).splitlines()
        marks = [
            line
            for line in lines
            if line.startswith("fsdp-worker")
            or any(word in line for word in ("terminate called", "what():", "Abort", "Error", "error:"))
        ]
        pytest.fail("\n".join([*marks[:60], "...", *lines[-40:]]), pytrace=False)
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
@RUNS_GROUP
def test_lora_resume_is_exact_and_matches_ddp(runs):
    straight, resumed, ddp = runs / "sd_straight", runs / "sd_resumed", runs / "sd_ddp"
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"):
        # stopped at 2, resumed from latest, trained on to 4: bit-identical to 4 straight steps
        assert _max_diff(load_file(straight / name), load_file(resumed / name)) == 0.0, name
        # the same steps under DDP: equal up to float rounding (the gradients are averaged alike)
        assert _max_diff(load_file(straight / name), load_file(ddp / name)) < 1e-6, name
    trained = load_file(straight / "checkpoints" / "4" / "pytorch_lora_weights.safetensors")
    assert _max_diff(trained, load_file(straight / "checkpoints" / "2" / "pytorch_lora_weights.safetensors")) > 1e-4
    # the gradient norm is the whole model's, not one rank's shard's: clipping acts on the true norm
    norms = [_grad_norms(d) for d in (straight, ddp)]
    assert len(norms[0]) == 4 and norms[0] == pytest.approx(norms[1], rel=1e-5)


def _grad_norms(run: Path) -> list[float]:
    with open(next(run.glob("logs/version_*/metrics.csv"))) as f:
        return [float(r["grad_norm"]) for r in csv.DictReader(f) if r.get("grad_norm")]


@pytest.mark.slow
@RUNS_GROUP
def test_sharded_checkpoints_hold_only_what_trains_and_resume_from_latest(runs, demo_dir):
    from diffusers import StableDiffusionPipeline
    from torch.distributed.checkpoint import FileSystemReader

    from callbacks.checkpoints import CKPT_NAME, list_checkpoints, readable, resolve_checkpoint

    root = runs / "sd_resumed" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["2", "4"]
    sharded = root / "4" / CKPT_NAME  # a folder: a shard per rank, the index, Lightning's metadata
    assert {p.name for p in sharded.iterdir()} == {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"}
    assert readable(sharded) and json.loads((root / "4" / "tracker_state.json").read_text())["global_step"] == 4
    keys = FileSystemReader(sharded).read_metadata().state_dict_metadata
    saved = [k for k in keys if k.startswith("state_dict.")]
    lora = load_file(root / "4" / "pytorch_lora_weights.safetensors")
    assert len(saved) == len(lora) and all(".lora_" in k for k in saved)  # no frozen weight went in
    # the EMA's averages stay sharded too: each rank's shard beside its weights, only a mark in meta.pt
    averages = [k for k in keys if k.startswith("callbacks.EMA/shadow/")]
    assert sorted(k.rpartition("/")[2] for k in averages) == sorted(k.removeprefix("state_dict.") for k in saved)
    meta = torch.load(sharded / "meta.pt", map_location="cpu", weights_only=False)
    assert all(
        isinstance(v, str) and v.startswith("tuner:sharded:") for v in meta["callbacks"]["EMA"]["shadow"].values()
    )
    # a half-written newer one (no index yet) is passed over by latest
    newer = root / "6" / CKPT_NAME
    newer.mkdir(parents=True)
    (newer / "meta.pt").write_bytes((sharded / "meta.pt").read_bytes())
    assert not readable(newer) and resolve_checkpoint("latest", root) == str(sharded)
    # the final LoRA is the last checkpoint's, and diffusers loads it
    final = load_file(runs / "sd_resumed" / "pytorch_lora_weights.safetensors")
    assert _max_diff(final, lora) == 0.0
    pipe = StableDiffusionPipeline.from_pretrained(demo_dir / "sd15")
    pipe.load_lora_weights(runs / "sd_resumed")
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


@pytest.mark.slow
@RUNS_GROUP
def test_transformer_full_finetune_matches_ddp(runs, demo_dir):
    """Flux's blocks return views of one tensor (FSDP warns that an in-place op on them would skip a
    gather): sharded by its blocks, with gradient checkpointing, it trains as DDP does."""
    from diffusers import FluxTransformer2DModel

    sharded, ddp = (
        FluxTransformer2DModel.from_pretrained(runs / d / "pipeline", subfolder="transformer")
        for d in ("flux_fp32", "flux_ddp")
    )
    base = FluxTransformer2DModel.from_pretrained(demo_dir / "flux", subfolder="transformer")
    assert _max_diff(sharded.state_dict(), ddp.state_dict()) < 1e-6
    assert _max_diff(sharded.state_dict(), base.state_dict()) > 1e-4
    assert _grad_norms(runs / "flux_fp32") == pytest.approx(_grad_norms(runs / "flux_ddp"), rel=1e-5)


@pytest.mark.slow
@RUNS_GROUP
def test_full_finetune_bf16_full_checkpoints_resume_and_export_a_pipeline(runs, demo_dir):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    straight, resumed = runs / "flux_straight", runs / "flux_resumed"
    ckpt = torch.load(resumed / "checkpoints" / "2" / "checkpoint.ckpt", map_location="cpu", weights_only=False)
    base = FluxTransformer2DModel.from_pretrained(demo_dir / "flux", subfolder="transformer")
    # one file gathered on rank 0, the whole transformer (it all trains) and nothing frozen
    assert set(ckpt["state_dict"]) == {f"transformer.{k}" for k, _ in base.named_parameters()}
    assert len(ckpt["optimizer_states"][0]["state"]) == len(ckpt["state_dict"])
    pipe = FluxPipeline.from_pretrained(resumed / "pipeline")
    at_3 = FluxTransformer2DModel.from_pretrained(resumed / "checkpoints" / "3", subfolder="transformer")
    exported, saved = pipe.transformer.state_dict(), at_3.state_dict()
    assert _max_diff(exported, saved) == 0.0 and _max_diff(exported, base.state_dict()) > 1e-4
    for name in ("pipeline", "pipeline_ema"):  # resumed from the one-file checkpoint: bit-identical
        a = FluxTransformer2DModel.from_pretrained(straight / name, subfolder="transformer").state_dict()
        b = FluxTransformer2DModel.from_pretrained(resumed / name, subfolder="transformer").state_dict()
        assert _max_diff(a, b) == 0.0, name


# ---- the worker ------------------------------------------------------------------------------------
def _worker(demo_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from hydra import compose, initialize_config_dir

    from tuner import run
    from tuner.config import register

    register()
    rank = os.environ.get("RANK", "?")
    for folder, overrides in RUNS:
        print(f"fsdp-worker rank {rank}: {folder} {' '.join(overrides)}", flush=True)
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"demo_assets_dir={demo_dir}", f"output_dir={out}/{folder}", *overrides])
        run.train(cfg)


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
