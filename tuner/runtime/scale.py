"""Sharded training of the denoiser: ``trainer=fsdp`` (conf/trainer/fsdp.yaml).

The denoiser's parameters, gradients and optimiser state are split across the ranks with PyTorch's
FSDP2 (``torch.distributed.fsdp.fully_shard``): one shard group per block the family declares
(``fsdp_blocks``, e.g. Flux's ``FluxTransformerBlock`` and ``FluxSingleTransformerBlock``), then the
denoiser itself for what lies outside the blocks. A block's weights are gathered just before it runs
and freed after it, so a rank holds the whole denoiser only in pieces. The frozen VAE and text encoders
are not sharded: each rank keeps its own copy, as under DDP.

Why FSDP2 under Lightning's ``ModelParallelStrategy`` and not Lightning's ``FSDPStrategy`` (FSDP1):
FSDP1 renames every parameter (``unet._fsdp_wrapped_module.…``), and the module keeps only its trainable
weights in a checkpoint by matching names, so a checkpoint would silently lose them; FSDP1 flattens a
block's weights into one tensor of one dtype, so a LoRA's fp32 adapters beside a bf16 base would force
the whole base to fp32; its gradients are plain per-rank shards, so the module's
``clip_grad_norm_`` would clip each shard by its own norm. FSDP2 keeps names and classes, shards each
tensor on its own (only trainable tensors need one dtype), and its gradients are DTensors whose norm is
the global one. Lightning also refuses ``FSDPStrategy`` on CPU, where FSDP2 runs on gloo.

Mixed precision follows ``mixed_precision``: Lightning's precision plugin autocasts as it does for any
strategy; with bf16 the shards are gathered in bf16 and gradients reduced in fp32. Activation
checkpointing is the denoiser's own (``model.gradient_checkpointing``, as on one device): diffusers
checkpoints exactly the block calls, and each recomputed block gathers its weights again.

Checkpoints: ``state_dict_type: sharded`` writes ``checkpoint.ckpt/`` as a folder (PyTorch distributed
checkpoint: one ``__<rank>_0.distcp`` per rank, ``.metadata``, and Lightning's ``meta.pt`` with the rest
of the state); ``full`` gathers the trainable weights and optimiser state on rank 0 into one file. Only
what trains is written either way. In the sharded layout a callback's own sharded state (the EMA's
averages, one shard per rank) goes into the ``.distcp`` shards too, with a mark in ``meta.pt`` where it
was: nothing is gathered onto one rank, whatever the model's size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf

from tuner.config import ConfigError

log = logging.getLogger(__name__)

META_NAME = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
SHARDED_MARK = "tuner:sharded:"  # in meta.pt, in place of a callback's sharded tensor: its key in the shards


def is_fsdp(cfg: DictConfig) -> bool:
    """Whether the run's trainer is the sharded one (``trainer=fsdp``)."""
    target = OmegaConf.select(cfg, "trainer.strategy._target_", default="")
    return str(target).endswith("DenoiserFSDP")


def check_sharding(cfg: DictConfig) -> None:
    """What a sharded trainer cannot do, refused before any weight loads, in one line: ``trainer=fsdp``'s
    limits, and what tuner cannot yet do under DeepSpeed (``trainer=deepspeed_zero2|3``)."""
    if is_fsdp(cfg):
        problems = fsdp_problems(cfg)
        if problems:
            raise ConfigError(f"trainer=fsdp: {'; '.join(problems)}")
    target = str(OmegaConf.select(cfg, "trainer.strategy._target_", default=""))
    if target.endswith("DeepSpeedStrategy"):
        stage = OmegaConf.select(cfg, "trainer.strategy.stage", default=2)
        if stage == 3:
            # rank 0 writes the LoRA / pipeline and the EMA from the module's weights, of which ZeRO-3
            # leaves it only an empty placeholder: the files would be empty, not an error
            raise ConfigError(
                "trainer=deepspeed_zero3: not supported yet (rank 0 writes the trained weights, and ZeRO-3 leaves "
                "it only its partition of them); for sharded weights use trainer=fsdp"
            )
        if cfg.resume_from_checkpoint:
            raise ConfigError(
                "resume_from_checkpoint under DeepSpeed: not supported yet (DeepSpeed writes a checkpoint folder of "
                "its own, which tuner cannot resume from); unset it, or train with trainer=ddp or trainer=fsdp"
            )


def fsdp_problems(cfg: DictConfig) -> list[str]:
    model, problems = cfg.model, []
    if _value(cfg.mixed_precision) == "fp16":
        problems.append("mixed_precision=fp16: use bf16 (fp16 would need a sharded gradient scaler)")
    if _value(model.finetune) == "lycoris":
        problems.append("model.finetune=lycoris: its network lives outside the sharded denoiser; use lora or full")
    if model.experts:
        problems.append("model.experts: two experts in one run are not supported with sharding yet")
    if _value(model.get("weight_dtype")) == "bf16":
        problems.append("model.weight_dtype=bf16: sharding keeps fp32 weights and computes in bf16 itself; use fp32")
    if model.lora.get("text_encoders"):
        problems.append("model.lora.text_encoders: only the denoiser is sharded, and the encoders' LoRA would not be kept in step")
    if _value(cfg.quantization.base_model_precision) not in ("no_change", None):
        problems.append("quantization.base_model_precision: a quantised denoiser cannot be sharded; use no_change")
    if cfg.callbacks.validation.enabled:
        problems.append(
            "callbacks.validation.enabled: validation samples on rank 0 alone, and a sharded denoiser needs "
            "every rank; set it to false"
        )
    state_dict_type = OmegaConf.select(cfg, "trainer.strategy.state_dict_type", default="sharded")
    if state_dict_type not in ("sharded", "full"):
        problems.append(f"trainer.strategy.state_dict_type={state_dict_type!r}; valid: sharded, full")
    return problems


def _value(v: Any) -> Any:
    return getattr(v, "name", v)  # an enum of the typed config, or its name once the config is plain


def block_classes(names: Sequence[str], denoiser: torch.nn.Module) -> tuple[type, ...]:
    """The classes of the denoiser's modules named in ``names`` (a family's ``fsdp_blocks``), found in the
    loaded denoiser, so that a diffusers version that renames a block fails here, not as a run that
    quietly shards nothing."""
    found = {type(m) for m in denoiser.modules() if type(m).__name__ in set(names)}
    if not found:
        raise ValueError(
            f"fsdp_blocks {sorted(names) or '(none declared)'}: the denoiser ({type(denoiser).__name__}) has no "
            "such modules; sharding follows the family's block classes"
        )
    missing = set(names) - {c.__name__ for c in found}
    if missing:
        log.warning("fsdp: the denoiser has no %s; sharding by %s", sorted(missing), sorted(c.__name__ for c in found))
    return tuple(sorted(found, key=lambda c: c.__name__))


def shard_denoiser(
    denoiser: torch.nn.Module, blocks: Sequence[type], mesh, mp_policy, reshard_after_forward: bool
) -> int:
    """``fully_shard`` each block of ``denoiser`` whose class is in ``blocks``, then the denoiser itself for
    the weights outside them (its input and output layers, embeddings). Returns the number of blocks."""
    from torch.distributed.fsdp import fully_shard

    targets = [m for m in denoiser.modules() if type(m) in tuple(blocks)]
    for block in targets:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(denoiser, mesh=mesh, mp_policy=mp_policy)  # the root: kept gathered from forward to backward
    return len(targets)


def fsdp_strategy(cfg: DictConfig, module) -> DenoiserFSDP:
    """The configured strategy for this module: ``cfg.trainer.strategy``'s settings, the family's block
    classes resolved from the loaded denoiser."""
    from hydra.utils import instantiate

    check_module(module)
    return instantiate(cfg.trainer.strategy, blocks=block_classes(type(module).fsdp_blocks, module.denoiser))


def check_module(module) -> None:
    """What the loaded module must be for sharding (``check_sharding`` says it from the config first)."""
    from models.trainable import is_quantized

    if getattr(module, "lycoris_net", None) is not None:
        raise ValueError("trainer=fsdp: model.finetune=lycoris is not supported")
    if getattr(module, "experts", None) is not None and module.hparams.experts:
        raise ValueError("trainer=fsdp: model.experts is not supported")
    if is_quantized(module.denoiser):
        raise ValueError("trainer=fsdp: a quantised denoiser cannot be sharded")


class DenoiserFSDP(ModelParallelStrategy):
    """FSDP2 over the denoiser's blocks, every rank one data-parallel replica (see the module docstring).

    ``blocks``: the block classes to shard by (``fsdp_strategy`` resolves them; None: from the family's
    ``fsdp_blocks`` when the model is set up). ``reshard_after_forward``: free a block's gathered weights
    after its forward (ZeRO-3; false keeps them until its backward: faster, more memory).
    ``gather_bf16``: with bf16 mixed precision, gather the shards in bf16 (FSDP's ``param_dtype``: half the
    traffic and memory of a full fine-tune's fp32 weights; norms then scale by bf16 weights); false: gather
    them as stored, and every op computes exactly as under DDP's autocast.
    ``state_dict_type``: ``sharded`` (a folder, each rank writes its shard) or ``full`` (one file).
    """

    def __init__(
        self,
        blocks: Sequence[type] | None = None,
        reshard_after_forward: bool = True,
        gather_bf16: bool = True,
        state_dict_type: str = "sharded",
        process_group_backend: str | None = None,
        **kwargs: Any,
    ):
        if state_dict_type not in ("sharded", "full"):
            raise ValueError(f"state_dict_type={state_dict_type!r}; valid: sharded, full")
        super().__init__(
            tensor_parallel_size=1,
            save_distributed_checkpoint=state_dict_type == "sharded",
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.blocks = tuple(blocks) if blocks else None
        self.reshard_after_forward = reshard_after_forward
        self.gather_bf16 = gather_bf16
        self.state_dict_type = state_dict_type

    # ---- set-up ---------------------------------------------------------------------------------
    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank holds one shard
        super().setup_environment()

    def setup(self, trainer) -> None:
        # ModelParallelStrategy.setup expects the module to shard itself in configure_model(); here the
        # strategy shards the denoiser from the family's declaration instead.
        from lightning.fabric.utilities.optimizer import _optimizers_to_device

        self.accelerator.setup(trainer)
        module = self.lightning_module
        check_module(module)
        self.shard(module)
        self.model_to_device()  # the frozen encoders and the rest (the shards are already in place)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def mp_policy(self):
        """FSDP's mixed precision from the run's (Lightning's precision plugin, which also autocasts).
        Inputs are left as the family passes them (a flow timestep must not be rounded to bf16)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.gather_bf16 and str(self.precision_plugin.precision).startswith("bf16"):
            # gradients are summed across ranks in fp32 all the same
            return MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
            )
        return MixedPrecisionPolicy(cast_forward_inputs=False)

    def shard(self, module) -> None:
        """The denoiser's declared blocks, then the denoiser (``shard_denoiser``), over every rank."""
        blocks = self.blocks or block_classes(type(module).fsdp_blocks, module.denoiser)
        mesh = self.device_mesh["data_parallel"]
        count = shard_denoiser(module.denoiser, blocks, mesh, self.mp_policy(), self.reshard_after_forward)
        names = ", ".join(c.__name__ for c in blocks)
        log.info("fsdp: %s sharded over %d ranks, %d blocks (%s)", module.denoiser_name, self.world_size, count, names)

    # ---- checkpoints: only what trains, by its plain name ----------------------------------------
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.lightning_module.named_parameters() if p.requires_grad}

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable weights: the shards themselves (sharded), or gathered on rank 0 (full). Every
        rank calls this (``trainer.save_checkpoint``). The frozen weights are never gathered."""
        trainable = self._trainable()
        if self.state_dict_type == "sharded":
            return {name: p.detach() for name, p in trainable.items()}
        return dict(gather_full(trainable, keep=self.is_global_zero))

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
        full = self.state_dict_type == "full"
        options = StateDictOptions(full_state_dict=full, cpu_offload=full)
        return get_optimizer_state_dict(self.lightning_module, optimizer, options=options)

    @property
    def shards_callback_state(self) -> bool:
        """Whether a callback may leave its sharded tensors (DTensors) in its ``state_dict``: the sharded
        layout writes them shard by shard (``save_checkpoint``) and gives them back the same way."""
        return self._save_distributed_checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Lightning's sharded layout (the weights and optimiser state by PyTorch's distributed checkpoint,
        the rest in ``meta.pt`` from rank 0), plus the callbacks' sharded tensors beside the weights."""
        sharded: dict[str, torch.Tensor] = {}
        if self._save_distributed_checkpoint and storage_options is None and "callbacks" in checkpoint:
            checkpoint["callbacks"] = _take_sharded(checkpoint["callbacks"], sharded)
        if not sharded:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        import torch.distributed.checkpoint as dcp

        path = Path(self.broadcast(filepath))
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict"), "callbacks": sharded}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        dcp.save(state, checkpoint_id=path)
        if self.global_rank == 0:
            torch.save(checkpoint, path / META_NAME)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Either layout, whichever this run writes: the trainable weights and the optimiser state go
        straight into the shards. The returned checkpoint keeps ``state_dict`` (what was loaded), which the
        module checks against what it trains."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            checkpoint = self._load_sharded(path, weights_only)
        else:
            checkpoint = self._load_full(path, weights_only)
        return checkpoint

    def _load_sharded(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        module = self.lightning_module
        weights = {name: p.detach() for name, p in self._trainable().items()}
        dcp.load({"state_dict": weights}, checkpoint_id=path)  # into the shards, in place
        if self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            for i, optimizer in enumerate(self.optimizers):
                state = {f"optimizer_{i}": get_optimizer_state_dict(module, optimizer)}
                dcp.load(state, checkpoint_id=path)
                set_optimizer_state_dict(module, optimizer, state[f"optimizer_{i}"])
        checkpoint = torch.load(path / META_NAME, map_location="cpu", weights_only=bool(weights_only))
        checkpoint["state_dict"] = weights
        marks = _marks(checkpoint.get("callbacks", {}))  # key in the shards -> the weight it belongs to
        if marks:
            params = self._trainable()
            unknown = sorted({name for name in marks.values() if name not in params})
            if unknown:
                raise ValueError(f"{path}: callback state for weights this run does not train, e.g. {unknown[0]!r}")
            # each in its weight's layout: every rank reads back its own shard
            loaded = {key: torch.zeros_like(params[name].detach(), dtype=torch.float32) for key, name in marks.items()}
            dcp.load({"callbacks": loaded}, checkpoint_id=path)
            checkpoint["callbacks"] = _put_sharded(checkpoint["callbacks"], loaded)
        return checkpoint

    def _load_full(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        module = self.lightning_module
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=bool(weights_only))
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(module, checkpoint["state_dict"], options=options)
        if module.trainer.state.fn == TrainerFn.FITTING:
            for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", []), strict=False):
                set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return checkpoint

    # ---- export: what rank 0 writes -------------------------------------------------------------
    @contextmanager
    def gathered_weights(self, pl_module) -> Iterator[None]:
        """Every rank enters. Inside, on rank 0, the denoiser's ``state_dict()`` holds full tensors of every
        weight that trains (gathered once, on entry; the frozen base of a LoRA is not) and the denoiser
        shows its own class, so diffusers and peft write exactly what an unsharded run writes. The other
        ranks wait at the exit. Nothing inside may run the denoiser (its blocks would gather)."""
        denoiser = pl_module.denoiser
        trainable = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
        full = dict(gather_full(trainable, keep=self.is_global_zero))
        undo = []
        try:
            if self.is_global_zero:
                undo.append(denoiser.register_state_dict_post_hook(_replace_entries(full)).remove)
                undo.append(_show_own_class(denoiser))
            yield
        finally:
            for step in reversed(undo):
                step()
            self.barrier("tuner.gathered_weights")


def _take_sharded(state: Any, out: dict[str, torch.Tensor], key: str = "") -> Any:
    """``state`` with each sharded tensor (DTensor) in it replaced by a mark; the tensors go into ``out``
    by their key: the path of dict keys to them, joined by ``/`` (the last is the weight's name)."""
    if isinstance(state, dict):
        return {k: _take_sharded(v, out, f"{key}/{k}" if key else str(k)) for k, v in state.items()}
    if type(state).__name__ == "DTensor":
        out[key] = state
        return SHARDED_MARK + key
    return state


def _marks(state: Any) -> dict[str, str]:
    """The marks ``_take_sharded`` left: key -> the weight's name."""
    if isinstance(state, dict):
        return {k: n for v in state.values() for k, n in _marks(v).items()}
    if isinstance(state, str) and state.startswith(SHARDED_MARK):
        key = state[len(SHARDED_MARK) :]
        return {key: key.rpartition("/")[2]}
    return {}


def _put_sharded(state: Any, loaded: dict[str, torch.Tensor]) -> Any:
    if isinstance(state, dict):
        return {k: _put_sharded(v, loaded) for k, v in state.items()}
    if isinstance(state, str) and state.startswith(SHARDED_MARK):
        return loaded[state[len(SHARDED_MARK) :]]
    return state


def gather_full(params: dict[str, torch.Tensor], keep: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor on the CPU) for each sharded (DTensor) or plain tensor; a collective, every rank
    calls it with the same names in the same order. ``keep=False`` (ranks other than 0) yields nothing
    and keeps no copy."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for name, p in params.items():
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            if keep:
                yield name, full.cpu()


def _replace_entries(full: dict[str, torch.Tensor]):
    def hook(module, state_dict, prefix, local_metadata):
        for name, tensor in full.items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = tensor

    return hook


def _show_own_class(module: torch.nn.Module):
    """Give a ``fully_shard``-ed module back its own class (diffusers writes ``type(self).__name__`` into
    the config it saves); returns the undo."""
    from torch.distributed.fsdp import FSDPModule

    sharded_class = type(module)
    own = next(c for c in sharded_class.__mro__ if not issubclass(c, FSDPModule))
    module.__class__ = own

    def undo() -> None:
        module.__class__ = sharded_class

    return undo
