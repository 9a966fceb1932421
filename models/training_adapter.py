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
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

NAME = "training_adapter"  # its adapter name in the denoiser (never a name the run's own LoRA takes)
KEY = "model.options.training_adapter"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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
    """The adapter's .safetensors file from ``spec``: a file, a folder holding one, or a Hub repo id
    (downloaded here, before the base weights load). Its header is read to check it holds LoRA weights."""
    path = Path(spec).expanduser()
    if not path.exists():
        if not _REPO_ID.fullmatch(spec) or spec.endswith(".safetensors"):
            raise ValueError(
                f"{KEY}={spec}: no such file or folder (give a LoRA .safetensors file, a folder holding one, or a "
                "Hub repo id such as ostris/FLUX.1-schnell-training-adapter)"
            )
        path = _download(spec)
    if path.is_dir():
        path = _weights_in(path, spec)
    _check_lora_file(path, spec)
    return path


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors"]))
    except Exception as err:  # the Hub's errors are long; the user needs the key and the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{KEY}={repo_id}: not a local path, and the Hub would not give it ({first})") from None


def _weights_in(folder: Path, spec: str) -> Path:
    """diffusers' file name when present, else the folder's only .safetensors file."""
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        return folder / "pytorch_lora_weights.safetensors"
    found = sorted(folder.glob("*.safetensors"))
    if len(found) != 1:
        raise ValueError(f"{KEY}={spec}: the folder holds {len(found)} .safetensors files; name the adapter's file")
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
        state, alphas, metadata = pipeline_class.lora_state_dict(
            str(path), return_alphas=True, return_lora_metadata=True
        )
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
