"""Latent and text-embedding caches: filled once, keyed on what changes them, trusted only when whole."""

import csv
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuner.run import train


def _entries(cache: Path, kind: str) -> set[str]:
    return {p.name for p in (cache / kind).glob("*/*.safetensors")}


def _first_losses(out: Path, n: int = 3) -> list[float]:
    (metrics,) = out.glob("logs/*/metrics.csv")
    return [float(r["train/loss_step"]) for r in csv.DictReader(metrics.open()) if r["train/loss_step"]][:n]


def test_caches_fill_once_and_train_like_no_cache(make_cfg, tmp_path):
    cache = tmp_path / "cache"
    common = ("data.crop_style=center", f"data.cache_dir={cache}", "max_train_steps=3", "checkpointing_steps=0")
    train(make_cfg(*common, output_dir=tmp_path / "a"))
    latents, embeds = _entries(cache, "latents"), _entries(cache, "text_embeds")
    assert len(latents) == 12 and len(embeds) == 8  # 12 images, 8 distinct captions
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*/*/*.safetensors")}

    train(make_cfg(*common, output_dir=tmp_path / "b"))
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/*/*.safetensors")} == stamps  # reused, not rewritten

    plain = (*common[:1], "data.cache_latents=false", "data.cache_text_embeds=false", *common[2:])
    train(make_cfg(*plain, f"data.cache_dir={tmp_path / 'nocache'}", output_dir=tmp_path / "c"))
    assert not (tmp_path / "nocache" / "latents").exists()
    cached, uncached = _first_losses(tmp_path / "a"), _first_losses(tmp_path / "c")
    assert torch.allclose(torch.tensor(cached), torch.tensor(uncached), atol=1e-4), (cached, uncached)


def test_cache_keys_follow_caption_precision_and_crop(make_cfg, tmp_path, demo_dir):
    cache = tmp_path / "cache"
    base = ("data.crop_style=center", f"data.cache_dir={cache}", "max_train_steps=1", "checkpointing_steps=0")
    train(make_cfg(*base, output_dir=tmp_path / "a"))
    first_latents, first_embeds = _entries(cache, "latents"), _entries(cache, "text_embeds")
    train(make_cfg(*base, "data.instance_prompt=sks", output_dir=tmp_path / "b"))  # new captions, same images
    assert _entries(cache, "latents") == first_latents
    assert len(_entries(cache, "text_embeds") - first_embeds) == 8
    train(make_cfg(*base, "mixed_precision=bf16", output_dir=tmp_path / "c"))  # another VAE dtype
    assert len(_entries(cache, "latents") - first_latents) == 12
    train(make_cfg(*base, "data.crop_style=corner", output_dir=tmp_path / "d"))  # another crop
    assert len(_entries(cache, "latents")) == 36


def test_damaged_entries_are_recomputed(make_cfg, tmp_path):
    cache = tmp_path / "cache"
    base = ("data.crop_style=center", f"data.cache_dir={cache}", "max_train_steps=1", "checkpointing_steps=0")
    train(make_cfg(*base, output_dir=tmp_path / "a"))
    victim = sorted((cache / "latents").glob("*/*.safetensors"))[0]
    good = {k: v.clone() for k, v in load_file(victim).items()}  # load_file maps the file; copy before damaging it
    victim.write_bytes(victim.read_bytes()[:40])  # a write cut short
    train(make_cfg(*base, output_dir=tmp_path / "b"))
    again = load_file(victim)
    assert torch.allclose(again["encoded"], good["encoded"], atol=1e-5)  # re-encoded alone: same up to batching


def test_random_crops_are_never_cached(make_cfg, tmp_path):
    cache = tmp_path / "cache"
    train(make_cfg("data.crop_style=random", f"data.cache_dir={cache}", "max_train_steps=1", output_dir=tmp_path / "a"))
    assert not _entries(cache, "latents") and _entries(cache, "text_embeds")


def test_encoders_are_offloaded_once_cached(make_cfg, tmp_path):
    from hydra.utils import instantiate

    from tuner.run import prepare

    cfg = prepare(make_cfg("data.crop_style=center", output_dir=tmp_path))
    module = instantiate(cfg.model, optimizer=None, lr_scheduler=None)
    dm = instantiate(cfg.data, seed=0, cache_dir=str(tmp_path / "cache"))
    encoders = module.data_encoders()
    offloads = []
    encoders["offload"] = lambda **kw: (offloads.append(kw), module.offload_encoders(**kw))
    dm.attach_encoders(**encoders)
    dm.scan()
    batch = next(iter(dm.train_dataloader()))
    assert offloads == [{"vae": True, "text": True}]
    assert "encoded" in batch and "pixels" not in batch and set(batch["cond"]) == {"encoder_hidden_states"}
    assert module._uncond is not None  # the empty prompt was encoded before the text encoder left
    loss = module.compute_loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_a_swapped_vae_invalidates_latents_not_embeddings(make_cfg, demo_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(demo_dir / "sd15", model)
    cache = tmp_path / "cache"
    base = (
        f"model.pretrained_model_name_or_path={model}",
        "data.crop_style=center",
        f"data.cache_dir={cache}",
        "max_train_steps=1",
        "checkpointing_steps=0",
    )
    train(make_cfg(*base, output_dir=tmp_path / "a"))
    latents, embeds = _entries(cache, "latents"), _entries(cache, "text_embeds")
    (weights,) = (model / "vae").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes())  # a new VAE file dropped in (same name, new file)
    train(make_cfg(*base, output_dir=tmp_path / "b"))
    assert len(_entries(cache, "latents") - latents) == 12
    assert _entries(cache, "text_embeds") == embeds


def _overwrite_tensor_bytes(path: Path) -> None:
    """NaN bytes over an entry's tensor data, its header and size intact (a bad disk, a copy gone wrong)."""
    import struct

    raw = bytearray(path.read_bytes())
    data_start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[data_start:] = b"\xff" * (len(raw) - data_start)
    path.write_bytes(bytes(raw))


def test_entries_whose_bytes_changed_fail_their_checksum_and_are_encoded_again(make_cfg, tmp_path):
    from datamodules.cache import CorruptEntry, TensorCache

    cache = tmp_path / "cache"
    base = ("data.crop_style=center", f"data.cache_dir={cache}", "checkpointing_steps=0")
    train(make_cfg(*base, "max_train_steps=1", output_dir=tmp_path / "a"))
    entries = sorted(cache.glob("*/*/*.safetensors"))
    good = {p: {k: v.clone() for k, v in load_file(p).items()} for p in entries}
    for path in entries:
        _overwrite_tensor_bytes(path)
    with pytest.raises(CorruptEntry, match="fails its checksum"):
        TensorCache(entries[0].parents[1]).load(entries[0].stem)

    loss = train(make_cfg(*base, "max_train_steps=4", output_dir=tmp_path / "b"))  # it read NaN before checksums
    assert loss is not None and math.isfinite(loss)
    log = (tmp_path / "b" / "train.log").read_text()
    assert "fails its checksum (its bytes changed after it was written); encoded again" in log
    read_again = [p for p in entries if _verifies(p)]
    assert read_again  # every entry this run read is whole again, and as it was
    for path in read_again:
        assert all(torch.allclose(load_file(path)[k].float(), v.float(), atol=1e-5) for k, v in good[path].items())


def _verifies(path: Path) -> bool:
    from datamodules.cache import CorruptEntry, TensorCache

    try:
        TensorCache(path.parents[1]).load(path.stem)
    except CorruptEntry:
        return False
    return True
