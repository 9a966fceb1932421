"""Resume: reaches the target step, and on CPU continues bit-identically to a straight run."""

import pytest
import torch
from safetensors.torch import load_file

from callbacks.checkpoints import CheckpointError, list_checkpoints, resolve_checkpoint
from tuner.run import train


def _lora(out):
    return load_file(out / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("crop_style", ["random", "center"])  # center: from the latent cache
def test_resume_latest_is_bit_identical_to_a_straight_run(crop_style, make_cfg, tmp_path):
    # batch 2 over 12 images in 3 buckets = 6 batches an epoch: step 4 is mid-epoch, 10 is in the next one.
    common = ("data.caption_dropout_probability=0.3", f"data.crop_style={crop_style}", "checkpointing_steps=4")
    straight = tmp_path / "straight"
    train(make_cfg(*common, "max_train_steps=10", output_dir=straight))

    resumed = tmp_path / "resumed"
    train(make_cfg(*common, "max_train_steps=4", output_dir=resumed))
    assert [p.name for p in list_checkpoints(resumed / "checkpoints")] == ["4"]
    train(make_cfg(*common, "max_train_steps=10", "resume_from_checkpoint=latest", output_dir=resumed))

    a, b = _lora(straight), _lora(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ckpt = torch.load(resolve_checkpoint("latest", resumed / "checkpoints"), weights_only=False)
    assert ckpt["global_step"] == 10


def test_resume_from_a_path_and_latest_without_checkpoints(make_cfg, tmp_path):
    out = tmp_path / "out"
    train(make_cfg("max_train_steps=2", "checkpointing_steps=2", output_dir=out))
    path = out / "checkpoints" / "2"
    other = tmp_path / "other"
    train(make_cfg("max_train_steps=3", f"resume_from_checkpoint={path}", output_dir=other))
    assert [p.name for p in list_checkpoints(other / "checkpoints")] == ["3"]
    # "latest" with nothing to resume from starts fresh (the seed's behaviour), with a warning
    fresh = tmp_path / "fresh"
    train(make_cfg("max_train_steps=1", "resume_from_checkpoint=latest", output_dir=fresh))
    assert [p.name for p in list_checkpoints(fresh / "checkpoints")] == ["1"]


def test_resume_with_other_trainable_weights_is_refused(make_cfg, tmp_path):
    out = tmp_path / "out"
    train(make_cfg("max_train_steps=2", output_dir=out))
    with pytest.raises(CheckpointError, match="lora_target_modules: checkpoint"):
        train(
            make_cfg(
                "max_train_steps=4",
                "model.lora.target_modules=[to_q,to_v,proj_in]",
                "resume_from_checkpoint=latest",
                output_dir=out,
            )
        )


def test_epochs_and_gradient_accumulation_count_optimizer_steps(make_cfg, tmp_path):
    # 12 demo images, batch 2 -> 6 batches an epoch; accumulating 2 -> 3 optimiser steps an epoch.
    out = tmp_path / "epochs"
    train(make_cfg("max_train_steps=0", "num_train_epochs=2", "gradient_accumulation_steps=2", output_dir=out))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["4", "6"]  # every 2 steps, limit 2
    ckpt = torch.load(out / "checkpoints" / "6" / "checkpoint.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1
    sampler = ckpt["DiffusionDataModule"]["sampler"]
    assert (sampler["epoch"], sampler["batch"], sampler["batch_size"]) == (1, 6, 2)


def test_a_fresh_run_sets_earlier_checkpoints_aside(make_cfg, tmp_path):
    out = tmp_path / "out"
    train(make_cfg("max_train_steps=4", output_dir=out))
    train(make_cfg("max_train_steps=2", output_dir=out))  # no resume: a new history in the same dir
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["2"]
    aside = sorted(p.name.split("-")[1] for p in (out / "checkpoints").glob("superseded-*"))
    assert aside == ["2", "4"]  # kept, not deleted; the new step 2 replaced nothing of theirs


def test_latest_skips_a_damaged_checkpoint_and_an_early_end_exports(make_cfg, tmp_path):
    out = tmp_path / "out"
    train(make_cfg("max_train_steps=4", "checkpointing_steps=2", output_dir=out))
    newest = out / "checkpoints" / "4" / "checkpoint.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # damaged after the fact (a disk error, a bad copy)
    assert resolve_checkpoint("latest", out / "checkpoints").endswith("2/checkpoint.ckpt")
    # The seed's early end: max_train_steps at or below the resumed step exports and stops at once.
    (out / "pytorch_lora_weights.safetensors").unlink()
    train(make_cfg("max_train_steps=2", "checkpointing_steps=2", "resume_from_checkpoint=latest", output_dir=out))
    exported = load_file(out / "pytorch_lora_weights.safetensors")
    at_two = load_file(out / "checkpoints" / "2" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(exported[k], at_two[k]) for k in at_two)


def test_a_save_that_fails_halfway_leaves_the_older_checkpoints(make_cfg, tmp_path, monkeypatch):
    import os

    import callbacks.checkpoints as ckpt

    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".tmp-6"):
            raise OSError(28, "No space left on device")  # the disk fills as step 6 is being saved
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        train(make_cfg("max_train_steps=8", "checkpointing_steps=2", "checkpoints_total_limit=2", output_dir=out))
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["2", "4"]  # the limit removed nothing
    assert resolve_checkpoint("latest", out / "checkpoints").endswith("4/checkpoint.ckpt")
    train(make_cfg("max_train_steps=6", "checkpointing_steps=2", "resume_from_checkpoint=latest", output_dir=out))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["4", "6"]
