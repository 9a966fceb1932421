"""Buckets, the stateful sampler, captions, EXIF and the scan report."""

import json
import random
from collections import Counter

import pytest
from PIL import Image

from datamodules import DiffusionDataModule, EmptyDatasetError
from datamodules.buckets import BucketBatchSampler, bucket_for
from datamodules.captions import caption_for, caption_from_filename
from datamodules.images import load_rgb, probe, resize_and_crop


def test_area_buckets_keep_area_and_align():
    assert bucket_for(1024, 1024, 1024, "area") == (1024, 1024)
    w, h = bucket_for(1500, 1000, 1024, "area")  # 3:2
    assert (w, h) == (1280, 832)  # sqrt(1024² * 1.5) = 1254 -> 1280; 836 -> 832
    assert w % 64 == 0 and h % 64 == 0
    assert bucket_for(1000, 1500, 1024, "area") == (832, 1280)
    assert bucket_for(3000, 2000, 1.0, "area") == bucket_for(1500, 1000, 1000, "area")  # megapixels
    assert bucket_for(100, 60, 64, "area", step=16) == (80, 48)


def test_pixel_buckets_set_the_short_edge():
    assert bucket_for(1500, 1000, 512, "pixel") == (768, 512)
    assert bucket_for(1000, 1500, 512, "pixel") == (512, 768)
    with pytest.raises(ValueError, match="valid: pixel, area"):
        bucket_for(1, 1, 512, "edge")


def test_sampler_one_bucket_per_batch_and_no_image_lost():
    buckets = [(64, 64)] * 5 + [(80, 48)] * 2 + [(48, 80)] * 1
    sampler = BucketBatchSampler(buckets, batch_size=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 + 1 + 1
    seen = Counter()
    for batch in batches:
        assert len(batch) == 3
        assert len({buckets[i] for i, _ in batch}) == 1
        seen.update(i for i, _ in batch)
    assert set(seen) == set(range(len(buckets)))  # the lone 48x80 image is repeated, not dropped


def test_sampler_ranks_are_disjoint_and_equal_length():
    buckets = [(64, 64)] * 8 + [(80, 48)] * 4
    ranks = [list(BucketBatchSampler(buckets, 2, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    flat = [[i for i, _ in b] for b in ranks[0]], [[i for i, _ in b] for b in ranks[1]]
    assert not {i for b in flat[0] for i in b} & {i for b in flat[1] for i in b}


def test_sampler_resumes_mid_epoch_and_reshuffles_per_epoch():
    buckets = [(64, 64)] * 10
    a = BucketBatchSampler(buckets, 2, seed=3)
    a.set_epoch(1)
    full = list(a)
    b = BucketBatchSampler(buckets, 2, seed=3)
    b.load_state_dict(a.state_dict(batches_done=2))
    b.set_epoch(1)
    assert list(b) == full[2:]
    assert list(b) == full  # the skip applies once
    b.set_epoch(2)
    assert [i for batch in b for i, _ in batch] != [i for batch in full for i, _ in batch]
    with pytest.raises(ValueError, match="processes"):
        BucketBatchSampler(buckets, 2, world_size=2).load_state_dict(a.state_dict(1))


def test_captions(tmp_path):
    assert caption_from_filename(tmp_path / "a_red_cube (2).jpg") == "a red cube"
    img = tmp_path / "photo_of_x.png"
    assert caption_for(img, "textfile", None) == ("photo of x", True)  # no sidecar: file name, counted
    img.with_suffix(".txt").write_bytes("caf\xe9 au lait\nsecond line".encode("cp1252"))
    assert caption_for(img, "textfile", "sks") == ("sks, café au lait", False)
    assert caption_for(img, "instanceprompt", "sks dog") == ("sks dog", False)


def test_exif_orientation_swaps_size_and_pixels(tmp_path):
    path = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (60, 30), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    img.save(path, exif=exif)
    assert probe(path) == (30, 60)
    assert load_rgb(path).size == (30, 60)


def test_rgba_composited_on_white_and_crop(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (40, 20), (0, 0, 0, 0)).save(path)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    out, (top, left) = resize_and_crop(img, (16, 16), "center", random.Random(0))
    assert out.size == (16, 16) and (top, left) == (0, 8)


def test_scan_skips_bad_files_with_reasons(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), "blue").save(data / "good one.png")
    Image.new("RGB", (8, 8), "blue").save(data / "tiny.png")
    (data / "empty.jpg").write_bytes(b"")
    (data / "text.jpg").write_text("not an image")
    (data / ".hidden.png").write_bytes(b"junk")
    (data / "notes.md").write_text("clutter is ignored")
    report = tmp_path / "out" / "dataset_report.json"
    dm = DiffusionDataModule(
        path=str(data), resolution=64, bucket_step=16, minimum_image_size=16, report_path=str(report)
    )
    samples = dm.scan()
    assert [s.caption for s in samples] == ["good one"]
    written = json.loads(report.read_text())
    assert written["usable"][0]["bucket"] == [64, 64] and written["usable"][0]["width"] == 64
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in written["skipped"]}
    assert set(reasons) == {"tiny.png", "empty.jpg", "text.jpg"}
    assert "too small" in reasons["tiny.png"]


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(EmptyDatasetError, match="no usable images"):
        DiffusionDataModule(path=str(tmp_path)).scan()
    with pytest.raises(EmptyDatasetError, match="not a directory"):
        DiffusionDataModule(path=str(tmp_path / "nope")).scan()


def test_per_dataset_overrides(tmp_path):
    for name, size in (("a", (64, 64)), ("b", (128, 64))):
        (tmp_path / name).mkdir()
        Image.new("RGB", size).save(tmp_path / name / f"{name}.png")
    dm = DiffusionDataModule(
        resolution=64,
        bucket_step=16,
        datasets={"a": {"path": str(tmp_path / "a")}, "b": {"path": str(tmp_path / "b"), "resolution_type": "pixel"}},
    )
    by_dataset = {s.dataset: s.bucket for s in dm.scan()}
    assert by_dataset == {"a": (64, 64), "b": (128, 64)}
