"""A training adapter: a LoRA that is active while the denoiser trains and left out of everything the run
samples or writes.

Flux.1 [schnell] is step-distilled: a plain flow-matching LoRA trained on it undoes the distillation, and
its samples at schnell's 1-4 steps go blurry. ostris/FLUX.1-schnell-training-adapter is a LoRA that
de-distills schnell; with it active while training, the user's LoRA learns only the new concept and then
applies on plain schnell at 4 steps (ai-toolkit's ``assistant_lora_path``, SimpleTuner's
``--assistant_lora_path``).

It is held as a second, frozen peft adapter of the denoiser (named ``training_adapter``), not fused into
the base weights:
- the base is often quantised (the presets' int8): fused weights could not be un-fused exactly to sample
  without it, and fusing before quantisation would bake it in;
- switching it off for validation samples is then exact, and whatever reads the trainable LoRA never sees
  it: the export takes the run's own adapter by name, the checkpoint the parameters that train;
- on resume it is loaded again from the same file, into the same dtype: the same bits.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

NAME = "training_adapter"  # its adapter name in the denoiser (never a name the run's own LoRA takes)
KEY = "model.options.training_adapter"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# a file in a Hub repo that holds several (ostris/zimage_turbo_training_adapter: v1 and v2), ai-toolkit's form
_REPO_FILE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)/(?P<file>[\w./-]+\.safetensors)")


def is_hub_spec(spec: str) -> bool:
    """Whether ``spec`` names a Hub repo (or a file in one) rather than a local path: fetched at load, not at
    the config check."""
    if Path(spec).expanduser().exists():
        return False
    return bool(_REPO_FILE.fullmatch(spec)) or (bool(_REPO_ID.fullmatch(spec)) and not spec.endswith(".safetensors"))


def run_problem(finetune: str, experts: str | None, expert_partner: str | None) -> str | None:
    """Why this run cannot have a training adapter, or None. Checked before any weight loads."""
    if finetune == "full":
        # A separate adapter would wrap the trained layers (their weights renamed to ``base_layer``), and a fused
        # one would have to be subtracted from every trained weight at each validation and at export: in
        # floating point that is not exact, and a full fine-tune's pipeline would carry the rounding.
        return f"{KEY} is for LoRA and LyCORIS runs: model.finetune=full would bake it into the weights it exports"
    if experts or expert_partner:
        # the experts switch the active adapter per timestep, which would switch this one off
        return f"{KEY} cannot be combined with model.experts or model.expert_partner"
    return None


def resolve_file(spec: str) -> Path:
    """The adapter's .safetensors file from ``spec``: a file, a folder holding one, a Hub repo id or a file in a
    Hub repo (``owner/repo/file.safetensors``), downloaded here, before the base weights load. Its header is read
    to check it holds LoRA weights."""
    path = Path(spec).expanduser()
    if not path.exists():
        if not is_hub_spec(spec):
            raise ValueError(
                f"{KEY}={spec}: no such file or folder (give a LoRA .safetensors file, a folder holding one, a Hub "
                "repo id such as ostris/FLUX.1-schnell-training-adapter, or a file in one: owner/repo/file.safetensors)"
            )
        path = _download(spec)
    if path.is_dir():
        path = _weights_in(path, spec)
    _check_lora_file(path, spec)
    return path


def _download(spec: str) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    one = _REPO_FILE.fullmatch(spec)
    try:
        if one:
            return Path(hf_hub_download(one["repo"], one["file"]))
        return Path(snapshot_download(spec, allow_patterns=["*.safetensors"]))
    except Exception as err:  # the Hub's errors are long; the user needs the key and the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{KEY}={spec}: not a local path, and the Hub would not give it ({first})") from None


def _weights_in(folder: Path, spec: str) -> Path:
    """diffusers' file name when present, else the folder's only .safetensors file."""
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        return folder / "pytorch_lora_weights.safetensors"
    found = sorted(folder.glob("*.safetensors"))
    if len(found) != 1:
        raise ValueError(
            f"{KEY}={spec}: the folder holds {len(found)} .safetensors files; name the adapter's file "
            "(a path, or owner/repo/file.safetensors for a Hub repo)"
        )
    return found[0]


def _check_lora_file(path: Path, spec: str) -> None:
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise ValueError(f"{KEY}={spec}: not a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:  # the header only; nothing loads
            keys = list(f.keys())
    except Exception as err:
        raise ValueError(f"{KEY}={spec}: not a readable safetensors file ({err})") from None
    if not any("lora" in k for k in keys):
        raise ValueError(f"{KEY}={spec}: holds no LoRA weights ({len(keys)} tensors, none named lora)")


def fingerprint(path: Path) -> str:
    """The file's content hash: what a resume compares (the same adapter may be reached by another path)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


class TrainingAdapter:
    """The adapter in a denoiser that already carries the run's trainable adapters (if any): loaded frozen in
    ``dtype``, active beside them, and switched off by ``left_out``."""

    def __init__(self, denoiser: torch.nn.Module, path: Path, pipeline_class: type, prefix: str, dtype: torch.dtype):
        self.denoiser, self.path, self.fingerprint = denoiser, path, fingerprint(path)
        flags = {p: p.requires_grad for p in denoiser.parameters()}
        # The family's own LoRA reader converts other trainers' key formats (kohya, ai-toolkit, xlabs) to diffusers'.
        out = pipeline_class.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
        # (state, alphas, metadata) where the loader keeps alphas apart (Flux); (state, metadata) where it folds
        # them into the weights or has none (Z-Image's loader takes no return_alphas)
        state, alphas, metadata = out if len(out) == 3 else (out[0], None, out[1])
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft initialises the layers (random draws) before the file overwrites them, and warns that the model
            # now has two adapters: it is meant to
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            denoiser.load_lora_adapter(
                state, network_alphas=alphas, metadata=metadata, adapter_name=NAME, prefix=prefix
            )
        self.parameters = [p for p in denoiser.parameters() if p not in flags]
        if not self.parameters:
            raise ValueError(f"{KEY}: {path} holds no LoRA weights for this model's {prefix}")
        for p in self.parameters:
            p.data = p.data.to(dtype)  # the frozen weights' dtype, whatever the file's
        self.trained = [name for name in denoiser.peft_config if name != NAME]
        _use(denoiser, [*self.trained, NAME], flags)

    @contextmanager
    def left_out(self) -> Iterator[None]:
        """The denoiser without the adapter (the run's own adapters still on), as users will sample it."""
        _use(self.denoiser, self.trained)
        try:
            yield
        finally:
            _use(self.denoiser, [*self.trained, NAME])


def _use(denoiser: torch.nn.Module, names: Sequence[str], flags: dict[Any, bool] | None = None) -> None:
    """Make ``names`` the active adapters of every LoRA layer. peft's ``set_adapter`` would also make them
    trainable: what trains is left as it was (``flags``: as given, anything else frozen)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    flags = flags if flags is not None else {p: p.requires_grad for p in denoiser.parameters()}
    for module in denoiser.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(list(names))
    for p in denoiser.parameters():
        p.requires_grad_(flags.get(p, False))


class TrainingAdapterHooks:
    """The DiffusionModule hooks of a family that can train with ``model.options.training_adapter`` (its Options
    has that field): mixed in ahead of DiffusionModule (FLUX.1 [schnell], Z-Image-Turbo). The adapter is checked
    before anything loads, loaded after the run's own LoRA, left out of validation samples (which sample as users
    will: without it), recorded by content in checkpoints, and a resume must bring the same one."""

    training_adapter: TrainingAdapter | None = None  # set up when model.options.training_adapter names one
    training_adapter_file: Path | None = None

    @classmethod
    def check_config(cls, model_cfg) -> None:
        super().check_config(model_cfg)
        spec = (model_cfg.options or {}).get("training_adapter")
        if spec is None:
            return
        problem = run_problem(model_cfg.finetune, model_cfg.experts, model_cfg.expert_partner)
        if problem:
            raise ValueError(problem)
        if not is_hub_spec(spec):  # a Hub id is fetched at load, not here
            resolve_file(spec)

    def load_components(self, path: str, common: dict) -> dict:
        # The adapter is checked (and fetched, when it is on the Hub) before the base weights load: a wrong path
        # costs a second, not a 24 GB download.
        spec = self.options.training_adapter
        if spec is not None:
            hp = self.hparams
            problem = run_problem(hp.finetune, hp.experts, hp.expert_partner)
            if problem:
                raise ValueError(problem)
            self.training_adapter_file = resolve_file(spec)
        return super().load_components(path, common)

    def _setup_trainable(self) -> None:
        super()._setup_trainable()
        # Loaded after the run's own adapter: the base is quantised by then (the adapter's weights must not be),
        # and peft's adding of the run's adapter would switch a loaded one off. Frozen, it changes nothing that
        # trains; the order only matters to peft.
        if self.training_adapter_file is not None:
            file = self.training_adapter_file
            denoiser = getattr(self, self.denoiser_name)
            self.training_adapter = TrainingAdapter(
                denoiser, file, self.pipeline_class, self.denoiser_name, self.denoiser_dtype
            )
            log.info("training adapter %s: active while training, left out of samples and exports", file)
        else:
            self.without_training_adapter()

    def without_training_adapter(self) -> None:
        """Called at set-up when the run has no training adapter (Flux warns on schnell)."""

    def sampling_context(self):
        # Validation samples as users will sample the exported LoRA: on the plain distilled model, without the
        # adapter. The validation loss keeps it on: it measures the model being trained.
        if self.training_adapter is None:
            return super().sampling_context()
        return self.training_adapter.left_out()

    def run_identity(self) -> dict:
        identity = super().run_identity()
        if self.training_adapter is not None:
            identity["training_adapter"] = self.training_adapter.fingerprint
        return identity

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # The check before load compares only the keys every family shares: a resume must also train with the
        # same adapter (by content), or it would go on against another objective.
        saved = (checkpoint.get("tuner_model") or {}).get("training_adapter")
        current = self.run_identity().get("training_adapter")
        if saved != current:
            raise ValueError(
                f"the checkpoint was trained with {KEY} {saved or 'unset'}, this run has "
                f"{current or 'none'}; resume with the same adapter file"
            )
