"""Split-schedule experts that share one sampling loop: the machinery for every family, in one place.

The noise range is split at ``model.expert_boundary`` (a fraction of the schedule): the **high-noise**
expert owns the levels from the boundary up (composition, large shapes), the **low-noise** expert those
below it (fine detail). Two setups put both experts into one denoiser:

- ``model.experts=two_lora``: one run trains two LoRA adapters, named ``high_noise`` and ``low_noise``, on
  the one frozen base. Each step draws its expert from a generator keyed by (seed, epoch, batch) alone, so
  every rank trains the same adapter; each expert is drawn with the share its range has of the run's noise
  distribution at the batch's own shift (Flux dev's depends on the image size). The step's timesteps are
  then drawn from that distribution truncated to the expert's range, and only its adapter runs (the
  other gets no gradient at all).
- ``model.expert=<one>`` with ``model.expert_partner=PATH``: the run trains one expert; the other's weights
  (a LoRA file or folder, or a ``pipeline/`` or denoiser folder) join at validation, so the low-noise
  expert's images come from the whole chain.

Sampling switches experts by the timestep the pipeline passes to the denoiser (a forward pre-hook), so it
works for every family's own pipeline: the idea of diffusers' ``WanPipeline`` with ``boundary_ratio``.

Where the checkpoint itself is two experts (Wan 2.2 A14B: ``transformer`` for high noise, ``transformer_2`` for
low), ``model.experts=two_lora`` puts one LoRA on each (``DiffusionModule.expert_denoisers``): the step's expert
picks the denoiser that runs, and the pipeline, handed both, switches at its ``boundary_ratio`` as it samples.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from models import noise as noise_schedules
from models import objectives as obj

log = logging.getLogger(__name__)

EXPERTS = ("high_noise", "low_noise")
EXPERT_DRAW_SALT = 0x5E1EC7  # keeps the expert draw apart from rank 0's own step generator


def owner(level: float, boundary: float) -> str:
    """The expert whose range holds ``level``: below the boundary the low-noise one."""
    return "low_noise" if level < boundary else "high_noise"


def other(expert: str) -> str:
    return EXPERTS[1 - EXPERTS.index(expert)]


def timestep_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The timestep a pipeline passes its denoiser: ``timestep=`` (transformers) or the second argument
    (UNets)."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        raise ValueError("the denoiser was called without a timestep; cannot tell which expert serves it")
    return torch.as_tensor(t)


class AdapterSwitch:
    """Which LoRA adapter of the denoiser runs. peft's ``set_adapter`` also freezes the other adapters;
    here trainability is left as it was, so both experts stay in the optimiser and the checkpoints."""

    def __init__(self, denoiser: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.denoiser = denoiser
        self.layer_type = BaseTunerLayer
        self.active: str | None = None

    def use(self, adapter: str) -> None:
        if adapter == self.active:
            return
        layers = [m for m in self.denoiser.modules() if isinstance(m, self.layer_type)]
        trainable = [(p, p.requires_grad) for m in layers for p in m.parameters()]
        for layer in layers:
            layer.set_adapter(adapter)
        for p, flag in trainable:
            p.requires_grad_(flag)
        self.active = adapter


class DenoiserSwitch:
    """Which expert's own denoiser runs (Wan 2.2 A14B: ``transformer`` for high noise, ``transformer_2`` for
    low): the module's ``denoiser`` follows it. Each denoiser carries one adapter, named after its expert."""

    def __init__(self, module: Any, denoisers: dict[str, str]):
        self.module, self.denoisers = module, denoisers
        self.active: str | None = None

    def use(self, expert: str) -> None:
        self.module.__dict__["active_denoiser"] = self.denoisers[expert]
        self.active = expert


class Experts:
    """The experts of a module: which adapter (or denoiser) serves which noise level, in training and
    in sampling. ``served`` logs (timestep, expert) for every denoiser call while sampling."""

    def __init__(self, module: Any):
        hp = module.hparams
        self.module = module
        self.boundary = float(hp.expert_boundary)
        self.two_lora = hp.experts == "two_lora"
        self.own = None if self.two_lora else str(hp.expert)
        self.partner_path = hp.expert_partner
        self.partner_kind: str | None = None  # "lora" or "full", once loaded
        self.partner_denoiser: torch.nn.Module | None = None
        own = module.expert_denoisers()
        self.own_denoisers = bool(own)  # each expert a denoiser of its own, which its pipeline switches itself
        if own:
            self.switch = DenoiserSwitch(module, own)
        else:
            self.switch = AdapterSwitch(module.denoiser) if hp.finetune == "lora" else None
        self.served: list[tuple[float, str]] = []
        self.trained_since_ema: set[str] = set()
        self.step_expert: str | None = None
        self.expert_draw: torch.Generator | None = None  # the step's, for its expert (two_lora)
        self.schedules = {}
        if self.two_lora:
            # each expert's own restriction of the run's schedule (its range, same density and shift)
            config = module.noise.config
            for name in EXPERTS:
                self.schedules[name] = noise_schedules.build(module.noise_schedule, config, _as_expert(hp, name))
            self.switch.use("high_noise")
            log.info(
                "two experts split at noise level %s: the low-noise expert trains ~%.0f%% of steps, the high-noise "
                "one the rest (their ranges' shares of the noise distribution%s)",
                self.boundary,
                100 * self.low_noise_share(),
                ", at the schedule's shift; a batch's own shift moves it" if module.noise.kind == "flow" else "",
            )

    # ---- training ---------------------------------------------------------------------------------
    def to(self, device) -> None:
        for schedule in self.schedules.values():
            schedule.to(device)

    def adapter(self, expert: str) -> str:
        """The adapter name an expert's LoRA has in the denoiser."""
        if self.two_lora:
            return expert
        return "default" if expert == self.own else "partner"

    def low_noise_share(self, shift: float | None = None) -> float:
        """The low-noise expert's share of steps: the run's schedule's mass below the boundary, at a batch's
        ``shift`` (Flux dev's depends on the image size) or else the schedule's own."""
        return self.module.noise.mass_below(self.boundary, shift)

    def begin_step(self, batch_idx: int) -> None:
        """A two-LoRA run's generator for this step's expert, keyed by (seed, epoch, batch) alone so that
        every rank draws alike. The draw itself waits for the batch's shift (``choose``)."""
        if not self.two_lora:
            return
        m = self.module
        self.expert_draw = torch.Generator().manual_seed(
            obj.step_seed(m.hparams.seed ^ EXPERT_DRAW_SALT, m.current_epoch, batch_idx)
        )
        self.step_expert = None

    def choose(self, shift: float | None) -> str:
        """The step's expert, drawn once with the low-noise share at the batch's ``shift``: as likely as the
        whole schedule's noise level falling in its range, which is what drawing a level would give."""
        if self.step_expert is None:
            if self.expert_draw is None:
                raise RuntimeError("a two-expert step samples timesteps before begin_step drew its expert")
            u = float(torch.rand(1, generator=self.expert_draw, dtype=torch.float64))
            self.step_expert = "low_noise" if u < self.low_noise_share(shift) else "high_noise"
            self.switch.use(self.step_expert)
            self.trained_since_ema.add(self.step_expert)
        return self.step_expert

    def schedule_for(self, fixed_level: float | None):
        """The schedule a loss samples from: the step's expert's, chosen when it samples (training), or the
        whole one with the adapter owning ``fixed_level`` switched on (validation loss)."""
        if not self.two_lora:
            return self.module.noise
        if fixed_level is None:
            return _StepExpert(self)
        self.switch.use(owner(fixed_level, self.boundary))
        return self.module.noise

    def updated_parameters(self, names: list[str]) -> list[str]:
        """Of the trainable parameter names, those of the experts trained since the last call (EMA)."""
        if not self.two_lora:
            return names
        trained, self.trained_since_ema = self.trained_since_ema, set()
        return [n for n in names if any(f".{expert}." in n for expert in trained)]

    # ---- sampling ---------------------------------------------------------------------------------
    @contextmanager
    def sampling(self):
        """Inside, each denoiser call is served by the expert owning its timestep's level."""
        if (not self.two_lora and self.partner_path is None) or self.own_denoisers:
            # the pipeline is handed both denoisers and its boundary (pipeline_components) and switches itself
            yield
            return
        if not self.two_lora:
            self._load_partner()
        m, denoiser = self.module, self.module.denoiser
        self.served = []
        before = self.switch.active if self.switch else None
        own_forward = denoiser.forward

        def dispatch(*args, **kwargs):
            t = timestep_of(args, kwargs)
            expert = owner(m.denoiser_level(t), self.boundary)
            self.served.append((float(t.flatten()[0]), expert))
            if self.partner_kind == "full" and expert != self.own:  # the other expert is a denoiser of its own
                return self.partner_denoiser(*args, **kwargs)
            if self.switch is not None:
                self.switch.use(self.adapter(expert))
            return own_forward(*args, **kwargs)

        # the pipeline calls the denoiser module; its forward is, for the while, the dispatch (hooks still run)
        denoiser.__dict__["forward"] = dispatch
        if self.partner_denoiser is not None:
            self.partner_denoiser.to(m.device)
        try:
            yield
        finally:
            denoiser.__dict__.pop("forward", None)
            if self.partner_denoiser is not None:
                self.partner_denoiser.to("cpu")
            if before is not None:
                self.switch.use(before)

    def _load_partner(self) -> None:
        """The other expert's weights, once: a LoRA as a second, frozen adapter (never trained, never
        checkpointed), or a fully fine-tuned denoiser kept on the CPU between validations."""
        if self.partner_kind is not None:
            return
        path = Path(self.partner_path)
        lora_file = _lora_file(path)
        m = self.module
        if lora_file is not None:
            if self.switch is None:
                raise ValueError(
                    f"model.expert_partner={path} is a LoRA, which applies to the base weights; this run fine-tunes "
                    "the whole denoiser, so its partner must be a pipeline/ folder"
                )
            load_lora_adapter(m.denoiser, lora_file, "partner", m.denoiser_name)
            self.switch.use("default")
            self.partner_kind = "lora"
        else:
            folder = path / m.denoiser_name if (path / m.denoiser_name / "config.json").is_file() else path
            self.partner_denoiser = type(m.denoiser).from_pretrained(folder, torch_dtype=m.denoiser_dtype).eval()
            self.partner_denoiser.requires_grad_(False)
            self.partner_kind = "full"
        log.info("expert partner (%s) loaded from %s for chained validation", self.partner_kind, path)


class _StepExpert:
    """What a two-LoRA step's loss samples timesteps from. Only ``sample`` knows the batch's shift (from its
    latents, ``flow_shift_for``), so the step's expert is chosen there, then its timesteps are drawn from
    its range at that same shift. The denoiser has not run yet, so its adapter is switched in time."""

    def __init__(self, experts: Experts):
        self.experts = experts

    def sample(self, n: int, generator: torch.Generator, shift: float | None = None) -> torch.Tensor:
        expert = self.experts.choose(shift)
        return self.experts.schedules[expert].sample(n, generator, shift)


def _as_expert(hp: Any, expert: str) -> Any:
    from lightning.fabric.utilities.data import AttributeDict

    return AttributeDict({**hp, "expert": expert})


def _lora_file(path: Path) -> Path | None:
    """A LoRA ``.safetensors`` file, or the one in a run's output folder; None for a pipeline folder."""
    if path.is_file():
        return path
    file = path / "pytorch_lora_weights.safetensors"
    return file if file.is_file() else None


def load_lora_adapter(denoiser: torch.nn.Module, file: Path, adapter: str, prefix: str) -> None:
    """A LoRA file (diffusers' or peft's keys, under ``<prefix>.``) into ``denoiser`` as a frozen adapter."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = {k.removeprefix(f"{prefix}."): v for k, v in load_file(str(file)).items() if k.startswith(f"{prefix}.")}
    if not state:
        raise ValueError(f"{file} holds no {prefix} LoRA weights")
    if not any(".lora_A." in k for k in state):
        state = convert_unet_state_dict_to_peft(state)
    with safe_open(str(file), "pt") as f:
        meta = (f.metadata() or {}).get("lora_adapter_metadata")
    if meta:
        # diffusers files it per component ("unet.r"); tuner's PixArt file has it plain ("r")
        settings = {k.removeprefix(f"{prefix}."): v for k, v in json.loads(meta).items()}
        config = LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], target_modules=settings["target_modules"])
    else:  # no metadata: rank from the shapes and alpha = rank, as diffusers assumes
        rank = next(v.shape[0] for k, v in state.items() if ".lora_A." in k)
        targets = sorted({k.split(".lora_A.")[0] for k in state if ".lora_A." in k})
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
    # peft makes the new adapter the active, trainable one: what trained before must go on training
    trainable = {name for name, p in denoiser.named_parameters() if p.requires_grad}
    inject_adapter_in_model(config, denoiser, adapter_name=adapter)
    result = set_peft_model_state_dict(denoiser, state, adapter_name=adapter)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{file}: {len(result.unexpected_keys)} weights fit no layer (e.g. {result.unexpected_keys[0]})")
    for name, p in denoiser.named_parameters():
        p.requires_grad_(name in trainable)
