"""Paired data: companions (reference, mask, control) found, reported, aligned with their targets and cached;
the masked loss; the paired-data config checks; resume with pairs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from datamodules import DiffusionDataModule
from datamodules.dataset import BucketedImageDataset
from models import objectives as obj
from tuner.config import ConfigError
from tuner.run import prepare, train


def _target(size, box) -> Image.Image:
    """White with a red box: the region a mask or a reference must keep its place against."""
    img = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(img).rectangle(box, fill=(255, 0, 0))
    return img


def _pairs(root: Path) -> Path:
    """targets/ (two sizes, one in a sub-folder), masks/ at half their size, references/ as copies (.jpg stems
    differ in extension from the .png targets), and an orphan reference."""
    for sub in ("targets/sub", "masks/sub", "references/sub"):
        (root / sub).mkdir(parents=True)
    for rel, size, box in (("one", (120, 80), (20, 10, 59, 49)), ("sub/two", (80, 120), (40, 60, 79, 99))):
        target = _target(size, box)
        target.save(root / "targets" / f"{rel}.png")
        target.save(root / "references" / f"{rel}.png")
        mask = Image.new("L", (size[0] // 2, size[1] // 2), 0)
        ImageDraw.Draw(mask).rectangle([c // 2 for c in box], fill=255)
        mask.save(root / "masks" / f"{rel}.png")
    Image.new("RGB", (64, 64)).save(root / "references" / "nobody.png")
    return root


def _module(root: Path, **keys) -> DiffusionDataModule:
    conditioning = keys.pop("conditioning", None) or {
        "reference": {"path": str(root / "references")},
        "mask": {"path": str(root / "masks")},
    }
    return DiffusionDataModule(
        path=str(root / "targets"),
        resolution=64,
        resolution_type="pixel",
        bucket_step=16,
        conditioning=conditioning,
        **keys,
    )


def test_companions_go_through_their_targets_bucket_and_crop_box(tmp_path):
    root = _pairs(tmp_path)
    conditioning = {
        "reference": {"path": str(root / "references")},
        "mask": {"path": str(root / "masks")},
        "control": {"path": str(root / "references")},
    }
    dm = _module(root, conditioning=conditioning, crop_style="random", crop_aspect="square")  # room to move
    samples = dm.scan()
    assert sorted(s.item.key for s in samples) == ["one.png", "sub/two.png"]
    dataset = BucketedImageDataset(samples, dm.sources, seed=0)
    crops = set()
    for index in range(len(samples)):
        for epoch in range(4):  # a random crop box each epoch; the companions follow it
            item = dataset[(index, epoch)]
            pixels, (reference,), mask = item["pixels"], item["reference_pixels"], item["mask"]
            crops.add(item["crop_top_left"])
            assert torch.equal(reference, pixels)  # the same picture, so the same pixels
            assert torch.equal(item["control_pixels"], pixels)
            assert mask.shape == (1, *pixels.shape[1:]) and set(mask.unique().tolist()) <= {0.0, 1.0}  # nearest
            red = (pixels[0] > 0.5) & (pixels[1] < -0.5)  # (H, W)
            agree = (red == (mask[0] > 0.5)).float().mean()
            assert agree > 0.95, (index, epoch, float(agree))  # off by at most the edge's resampling
    assert len(crops) > 2  # the crops did move


def test_a_reference_keeps_its_own_bucket_only_where_the_family_allows(tmp_path):
    root = _pairs(tmp_path)
    Image.new("RGB", (80, 120), (0, 0, 255)).save(root / "references" / "one.png")  # portrait input, landscape target
    conditioning = {"reference": {"path": str(root / "references")}}
    shared = _module(root, conditioning=conditioning)
    sample = next(s for s in shared.scan() if s.item.key == "one.png")
    assert sample.group == sample.bucket == (96, 64)
    item = BucketedImageDataset(shared.samples, shared.sources, 0)[(shared.samples.index(sample), 0)]
    assert item["reference_pixels"][0].shape == item["pixels"].shape

    own = _module(root, conditioning=conditioning, references_own_bucket=True, batch_size=2)
    sample = next(s for s in own.scan() if s.item.key == "one.png")
    assert sample.group == ((96, 64), ((64, 96),))
    for batch in own.train_dataloader():  # one group a batch: the references stack too
        assert batch["reference_pixels"][0].shape[0] == 2


def test_the_report_lists_pairs_targets_without_one_and_companions_without_a_target(tmp_path):
    root = _pairs(tmp_path)
    _target((96, 96), (0, 0, 10, 10)).save(root / "targets" / "alone.png")  # no reference, no mask
    _target((96, 96), (0, 0, 10, 10)).save(root / "targets" / "broken.png")
    (root / "references" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    Image.new("L", (48, 48)).save(root / "masks" / "broken.png")
    report = tmp_path / "report.json"
    dm = _module(root, report_path=str(report))
    assert len(dm.scan()) == 2
    written = json.loads(report.read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in written["skipped"]}
    assert skipped["alone.png"].startswith("no reference image (looked for")
    assert "reference image" in skipped["broken.png"] and "unusable" in skipped["broken.png"]
    pairs = written["pairs"]["default"]
    assert pairs["reference"]["pairs"] == 2 and pairs["mask"]["pairs"] == 3  # broken.png's mask is fine
    assert [Path(o["path"]).name for o in pairs["reference"]["companions_without_target"]] == ["nobody.png"]
    assert {Path(m["path"]).name for m in pairs["mask"]["targets_without"]} == {"alone.png"}
    usable = {Path(u["path"]).name: u for u in written["usable"]}
    assert {c["kind"] for c in usable["one.png"]["companions"]} == {"reference", "mask"}


def test_a_table_names_companions_in_a_column(tmp_path):
    root = _pairs(tmp_path)
    rows = [
        {"file_name": "targets/one.png", "text": "one", "input": "references/one.png"},
        {"file_name": "targets/sub/two.png", "text": "two", "input": None},
    ]
    table = root / "meta.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows))
    dm = DiffusionDataModule(
        path=str(table), resolution=64, bucket_step=16, conditioning={"reference": {"column": "input"}}
    )
    (sample,) = dm.scan()
    assert sample.caption == "one" and sample.companions[0].item.location == str(root / "references" / "one.png")
    assert dm.results["default"].skipped[0]["reason"] == "no reference image (looked for column 'input')"


def test_the_mask_can_come_from_the_alpha_channel(tmp_path):
    (tmp_path / "data").mkdir()
    img = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    ImageDraw.Draw(img).rectangle((16, 16, 47, 47), fill=(255, 0, 0, 255))
    img.save(tmp_path / "data" / "subject.png")
    dm = DiffusionDataModule(path=str(tmp_path / "data"), resolution=64, bucket_step=16, mask_from_alpha=True)
    item = BucketedImageDataset(dm.scan(), dm.sources, 0)[(0, 0)]
    expected = torch.zeros(1, 64, 64)
    expected[:, 16:48, 16:48] = 1
    assert torch.equal(item["mask"], expected)


def _encoders():
    def encode_pixels(pixels):  # a stand-in VAE: 8x average pooling, "mean" and "log-variance" (B, 6, h, w)
        pooled = F.avg_pool2d(pixels, 8)
        return torch.cat([pooled, torch.zeros_like(pooled)], dim=1)

    def encode_prompts(captions):
        return {"embeds": torch.zeros(len(captions), 4)}

    return encode_pixels, encode_prompts


def test_the_latent_cache_holds_references_and_masks_at_the_latent_grid(tmp_path):
    root = _pairs(tmp_path)
    dm = _module(root, cache_dir=str(tmp_path / "cache"), batch_size=1)
    encode_pixels, encode_prompts = _encoders()
    dm.attach_encoders(encode_pixels, encode_prompts, {"vae": "v", "text": "t"}, lambda **_: None)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    for batch in batches:
        (reference,) = batch["reference_encoded"]
        assert torch.equal(reference, batch["encoded"])  # the reference is the target's copy
        assert batch["mask"].shape == (1, 1, *batch["encoded"].shape[-2:])
        assert 0 < float(batch["mask"].mean()) < 1
    # the same companions again: served from the cache, identical; a changed mask is a new entry
    again = _module(root, cache_dir=str(tmp_path / "cache"), batch_size=1)
    again.attach_encoders(encode_pixels, encode_prompts, {"vae": "v", "text": "t"}, lambda **_: None)
    entries = sorted((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    list(again.train_dataloader())
    assert sorted((tmp_path / "cache" / "latents").rglob("*.safetensors")) == entries
    Image.new("L", (60, 40), 255).save(root / "masks" / "one.png")
    changed = _module(root, cache_dir=str(tmp_path / "cache"), batch_size=1)
    changed.attach_encoders(encode_pixels, encode_prompts, {"vae": "v", "text": "t"}, lambda **_: None)
    list(changed.train_dataloader())
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == len(entries) + 1


def test_masked_mse_weights_elements_and_normalises_by_the_masks_area():
    pred, tgt = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    tgt[1] = 3.0
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :2] = 1.0  # a quarter of sample 0 trains; none of sample 1
    assert float(obj.weighted_mse(pred, tgt, mask=mask)) == pytest.approx((1.0 + 0.0) / 2)
    half = mask.clone()
    half[0] *= 0.5  # grey weighs in proportion, and the area normalises it away
    assert float(obj.weighted_mse(pred, tgt, mask=half)) == pytest.approx(0.5)
    assert float(obj.weighted_mse(pred, tgt, mask=torch.ones(2, 1, 8, 8))) == float(obj.weighted_mse(pred, tgt))


def _black_masks(demo_dir: Path, root: Path, value: int = 0) -> Path:
    masks = root / f"masks_{value}"
    masks.mkdir(parents=True)
    for image in (demo_dir / "images").glob("*.png"):
        with Image.open(image) as img:
            Image.new("L", img.size, value).save(masks / image.name)
    return masks


def _lora_b(out: Path) -> float:
    state = load_file(out / "pytorch_lora_weights.safetensors")
    return max(float(v.abs().max()) for k, v in state.items() if k.endswith(("lora.up.weight", "lora_B.weight")))


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_a_run_whose_masks_are_all_black_learns_nothing(family, make_cfg, demo_dir, tmp_path):
    masks = _black_masks(demo_dir, tmp_path)
    cfg = make_cfg(
        f"model={family}",
        "model.masked_loss=true",
        f"data.conditioning.mask.path={masks}",
        "max_train_steps=2",
        "optimizer.lr=5e-2",
        "callbacks.validation.enabled=false",
        "callbacks.ema.enabled=false",
    )
    assert train(cfg) == 0.0
    assert _lora_b(Path(cfg.output_dir)) == 0.0  # no gradient reached the LoRA's B matrices


def test_white_masks_train_as_no_mask(make_cfg, demo_dir, tmp_path):
    """The control of the all-black test: a mask of ones is the plain loss, bit for bit."""
    masks = _black_masks(demo_dir, tmp_path, value=255)
    common = ("max_train_steps=2", "callbacks.validation.enabled=false", "callbacks.ema.enabled=false")
    plain, masked = tmp_path / "plain", tmp_path / "masked"
    train(make_cfg(*common, output_dir=plain))
    train(make_cfg(*common, "model.masked_loss=true", f"data.conditioning.mask.path={masks}", output_dir=masked))
    a, b = load_file(plain / "pytorch_lora_weights.safetensors"), load_file(masked / "pytorch_lora_weights.safetensors")
    assert _lora_b(plain) > 0 and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_with_masks_and_random_crops_is_bit_identical(make_cfg, demo_dir, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    rng = np.random.default_rng(0)
    for image in (demo_dir / "images").glob("*.png"):  # random masks, so a misaligned crop would change the loss
        with Image.open(image) as img:
            Image.fromarray((rng.random(img.size[::-1]) > 0.5).astype(np.uint8) * 255).save(masks / image.name)
    common = (
        "model.masked_loss=true",
        f"data.conditioning.mask.path={masks}",
        "data.crop_style=random",
        "checkpointing_steps=3",
        "callbacks.validation.enabled=false",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_cfg(*common, "max_train_steps=5", output_dir=straight))
    train(make_cfg(*common, "max_train_steps=3", output_dir=resumed))
    train(make_cfg(*common, "max_train_steps=5", "resume_from_checkpoint=latest", output_dir=resumed))
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_paired_settings_are_checked_against_the_family_before_anything_loads(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="does not take reference images"):
        prepare(make_cfg(f"data.conditioning.reference.path={tmp_path}"))
    with pytest.raises(ConfigError, match="model.masked_loss=true needs a mask"):
        prepare(make_cfg("model.masked_loss=true"))
    with pytest.raises(ConfigError, match="set model.masked_loss=true"):
        prepare(make_cfg("data.mask_from_alpha=true"))
    with pytest.raises(ConfigError, match="path or column, not both"):
        prepare(
            make_cfg(
                "model.masked_loss=true", f"data.conditioning.mask.path={tmp_path}", "data.conditioning.mask.column=m"
            )
        )
    with pytest.raises(ConfigError, match="trains on \\(target, reference\\) pairs"):
        prepare(make_cfg("model=flux_kontext", f"data.path={tmp_path}"))
    with pytest.raises(ConfigError, match="at most 1"):
        prepare(make_cfg("model=flux_kontext", f"data.conditioning.reference.path=[{tmp_path},{tmp_path}]"))
    with pytest.raises(ConfigError, match="one input image per prompt"):
        prepare(make_cfg("callbacks.validation.inputs=[a.png]", "callbacks.validation.prompts=[a,b]"))
    with pytest.raises(ConfigError, match="Did you mean 'reference'"):
        prepare(make_cfg(f"+data.conditioning.refrence.path={tmp_path}"))


def test_an_edit_runs_grid_shows_each_input_beside_its_output_and_its_card_says_image_to_image(matrix_run, demo_dir):
    out = matrix_run("flux_kontext", "lora").dir  # the demo's pairs, its inputs wired in by the tiny preset
    with Image.open(out / "validation" / "step_6" / "grid.png") as grid:
        # two prompts, each an (input, output) pair; the EMA's row and the live weights' row
        assert grid.size == (2 * 2 * 64, 2 * 64)
        cell = np.asarray(grid.convert("RGB").crop((0, 0, 64, 64)))
    with Image.open(demo_dir / "references" / "a red circle on white (0).png") as given:  # the first prompt's input
        assert np.array_equal(cell, np.asarray(given.convert("RGB").resize((64, 64))))
    card = (out / "README.md").read_text()
    assert "- image-to-image" in card and "- text-to-image" not in card
