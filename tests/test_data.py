"""Buckets, the stateful sampler, captions, EXIF and the scan report."""

import codecs
import io
import json
import random
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules import DiffusionDataModule, EmptyDatasetError
from datamodules.buckets import BucketBatchSampler, bucket_for, target_aspect
from datamodules.captions import caption_for, caption_from_filename, decode_text
from datamodules.images import load_rgb, probe, resize_and_crop, truncation


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
    # A saved position means nothing once the data or the batching changed: the epoch starts over.
    other = BucketBatchSampler(buckets[:-2], 2, seed=3)
    other.load_state_dict(a.state_dict(batches_done=2))
    other.set_epoch(1)
    assert len(list(other)) == len(other)


def test_sampler_fewer_batches_than_ranks_still_feeds_every_rank():
    per_rank = [list(BucketBatchSampler([(64, 64)], 1, rank=r, world_size=3)) for r in range(3)]
    assert [len(b) for b in per_rank] == [1, 1, 1]


def test_captions_from_filename_sidecar_and_instance_prompt(tmp_path):
    assert caption_from_filename(Path("a_red_cube (2).jpg")) == "a red cube"
    img = Path("photo_of_x.png")
    assert caption_for(img, "textfile", None, None) == (("photo of x",), True)  # no sidecar: file name, counted
    sidecar = "caf\xe9 au lait\n\nsecond line\n".encode("cp1252")  # a legacy Windows caption, two lines
    assert caption_for(img, "textfile", "sks", sidecar) == (("sks, café au lait", "sks, second line"), False)
    joined = caption_for(img, "textfile", None, sidecar, multiline=False)
    assert joined == (("café au lait second line",), False)
    assert caption_for(img, "instanceprompt", "sks dog", None) == (("sks dog",), False)
    assert caption_for(img, "column", None, None, "from the table") == (("from the table",), False)


@pytest.mark.parametrize(
    "raw",
    [
        "naïve café".encode(),
        codecs.BOM_UTF8 + "naïve café".encode(),
        "naïve café".encode("utf-16"),  # Notepad "Unicode", with BOM
        "naïve café".encode("utf-16-le"),  # no BOM
        "naïve café".encode("latin-1"),
    ],
)
def test_sidecar_encodings_decode_to_the_same_text(raw):
    assert decode_text(raw) == "naïve café"


def test_binary_sidecar_is_an_error_not_garbage():
    with pytest.raises(UnicodeError):
        decode_text(bytes(range(0, 40)) * 3)
    assert decode_text(b"a cat\x00") == "a cat"  # a stray NUL is not UTF-16
    assert decode_text(b"photo of a dog\x00\x00") == "photo of a dog"


def test_exif_orientation_swaps_size_and_pixels(tmp_path):
    path = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (60, 30), "white")
    img.paste((255, 0, 0), (0, 0, 30, 30))  # left half red as stored
    exif = img.getexif()
    exif[0x0112] = 6  # display rotated 90° clockwise: the red half ends up on top
    img.save(path, exif=exif, quality=95)
    with open(path, "rb") as f:
        assert probe(f) == (30, 60, "")
    with open(path, "rb") as f:
        shown = load_rgb(f)
    assert shown.size == (30, 60)
    top, bottom = shown.getpixel((15, 10)), shown.getpixel((15, 50))
    assert top[0] > 200 and top[1] < 60 and min(bottom) > 200


def test_odd_modes_are_converted_not_skipped(tmp_path):
    sixteen = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    palette = Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")
    for name, img in (("grey16.png", sixteen), ("cmyk.jpg", cmyk), ("palette.png", palette)):
        img.save(tmp_path / name)
    with open(tmp_path / "grey16.png", "rb") as f:
        assert load_rgb(f).getpixel((0, 0)) == (128, 128, 128)
    with open(tmp_path / "cmyk.jpg", "rb") as f:
        r, g, b = load_rgb(f).getpixel((0, 0))
        assert r > 200 and g < 60 and b < 60
    with open(tmp_path / "palette.png", "rb") as f:
        assert load_rgb(f).getpixel((0, 0)) == (0, 0, 255)


def test_truncation_check(tmp_path):
    for name in ("ok.jpg", "ok.png", "ok.webp"):
        Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        assert truncation(io.BytesIO(data)) is None, name
        assert truncation(io.BytesIO(data[: len(data) * 2 // 3])), name


def test_rgba_composited_on_white_and_crop(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (40, 20), (0, 0, 0, 0)).save(path)
    with open(path, "rb") as f:
        img = load_rgb(f)
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
    noise = Image.effect_noise((64, 64), 50).convert("RGB")
    noise.save(data / "cut.jpg")
    (data / "cut.jpg").write_bytes((data / "cut.jpg").read_bytes()[:900])  # a half-written download
    noise.save(data / "utf16.png")
    (data / "utf16.txt").write_bytes("a cat on a mat".encode("utf-16"))
    noise.save(data / "binary caption.png")
    (data / "binary caption.txt").write_bytes(bytes(range(40)))
    (data / ".hidden.png").write_bytes(b"junk")
    (data / "notes.md").write_text("clutter is ignored")
    report = tmp_path / "out" / "dataset_report.json"
    dm = DiffusionDataModule(
        path=str(data),
        resolution=64,
        bucket_step=16,
        minimum_image_size=16,
        caption_strategy="textfile",
        report_path=str(report),
    )
    samples = dm.scan()
    assert sorted(s.caption for s in samples) == ["a cat on a mat", "good one"]
    written = json.loads(report.read_text())
    assert written["usable"][0]["bucket"] == [64, 64] and written["usable"][0]["width"] == 64
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in written["skipped"]}
    assert set(reasons) == {"tiny.png", "empty.jpg", "text.jpg", "cut.jpg", "binary caption.png"}
    assert "too small" in reasons["tiny.png"]
    assert "truncated JPEG" in reasons["cut.jpg"]
    assert "unreadable caption" in reasons["binary caption.png"]


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


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG that claims ``width`` x ``height`` but holds one tiny compressed row: a bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header_only(60000, 60000))
    (tmp_path / "big.png").write_bytes(_png_header_only(14000, 14000))  # 196 MP: past where PIL refuses
    (tmp_path / "photo.png").write_bytes(_png_header_only(11648, 8736))  # a real 100 MP camera: kept
    Image.new("RGB", (64, 64)).save(tmp_path / "fine.png")
    dm = DiffusionDataModule(path=str(tmp_path), resolution=64, report_path=str(tmp_path / "r.json"))
    assert [s.item.key for s in dm.scan()] == ["fine.png", "photo.png"]
    reasons = {
        r["path"].rsplit("/", 1)[-1]: r["reason"] for r in json.loads((tmp_path / "r.json").read_text())["skipped"]
    }
    assert "exceeds" in reasons["bomb.png"] and "exceeds" in reasons["big.png"]


def test_scan_cache_probes_only_what_changed(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    for i in range(5):
        Image.new("RGB", (64 + 16 * i, 64)).save(data / f"img{i}.png")

    def scan(resolution=64):
        dm = DiffusionDataModule(path=str(data), resolution=resolution, bucket_step=16, cache_dir=str(cache))
        dm.scan()
        return dm

    assert scan().results["default"].probed == 5
    assert scan().results["default"].probed == 0  # nothing changed: no image is read
    Image.new("RGB", (200, 64)).save(data / "img0.png")  # a changed file
    (data / "img4.png").unlink()
    again = scan()
    assert again.results["default"].probed == 1
    assert {s.item.key: s.width for s in again.samples}["img0.png"] == 200 and len(again.samples) == 4
    # A config change re-buckets from the cached sizes: never a stale bucket
    assert {s.bucket for s in scan(resolution=32).samples} != {s.bucket for s in again.samples}
    (cache / "scan").joinpath(next((cache / "scan").iterdir()).name).write_text("{broken")
    assert scan().results["default"].probed == 4  # a damaged cache is rebuilt, not trusted


def test_multiline_captions_are_drawn_per_use(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("first caption\nsecond caption\nthird caption\n")
    dm = DiffusionDataModule(path=str(tmp_path), resolution=64, caption_strategy="textfile")
    dm.scan()
    ds = dm.train_dataloader().dataset
    drawn = {ds[(0, epoch)]["caption"] for epoch in range(30)}
    assert drawn == {"first caption", "second caption", "third caption"}
    assert ds[(0, 7)]["caption"] == ds[(0, 7)]["caption"]  # the same draw for the same epoch, on resume too


def test_repeats_and_probability_shape_each_epoch():
    buckets = [(64, 64)] * 6
    datasets = ["a"] * 4 + ["b"] * 2
    sampler = BucketBatchSampler(buckets, 1, seed=0, datasets=datasets, repeats={"b": 2}, probability={"a": 0.5})
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen = Counter(i for batch in sampler for i, _ in batch)
        assert len(sampler) == 2 + 6  # half of a's 4, all of b's 2 three times
        assert sum(n for i, n in seen.items() if i < 4) == 2
        assert all(seen[i] == 3 for i in (4, 5))
    first = [
        i for batch in BucketBatchSampler(buckets, 1, 0, datasets=datasets, probability={"a": 0.5}) for i, _ in batch
    ]
    assert len(first) == 4


def test_crop_aspect_and_crop_modes():
    assert bucket_for(1500, 1000, 1024, "area", crop_aspect="square") == (1024, 1024)
    assert target_aspect(1920, 1000, "closest") == 2.0  # 1.92 is nearest 2:1
    assert bucket_for(1920, 1000, 512, "pixel", crop_aspect="closest") == (1024, 512)
    img = Image.new("RGB", (100, 50))
    corner, (top, left) = resize_and_crop(img, (32, 32), "corner", random.Random(0))
    assert corner.size == (32, 32) and (top, left) == (0, 0)
    squashed, offset = resize_and_crop(img, (48, 32), "center", random.Random(0), crop=False)
    assert squashed.size == (48, 32) and offset == (0, 0)


def test_regularisation_flag_reaches_the_batch(tmp_path):
    for name in ("subject", "prior"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (64, 64)).save(tmp_path / name / f"{name}.png")
    dm = DiffusionDataModule(
        resolution=64,
        batch_size=2,
        datasets={
            "subject": {"path": str(tmp_path / "subject")},
            "prior": {"path": str(tmp_path / "prior"), "is_regularisation_data": True},
        },
    )
    dm.scan()
    batch = next(iter(dm.train_dataloader()))
    flags = dict(zip(batch["captions"], batch["is_regularisation"].tolist(), strict=True))
    assert flags == {"subject": False, "prior": True}


def test_large_images_are_downsampled_then_detail_cropped(tmp_path):
    Image.effect_noise((400, 300), 40).convert("RGB").save(tmp_path / "big.png")
    Image.new("RGB", (80, 60)).save(tmp_path / "small.png")
    dm = DiffusionDataModule(
        path=str(tmp_path),
        resolution=64,
        resolution_type="pixel",
        bucket_step=16,
        maximum_image_size=128,  # shorter edge above 128 px...
        target_downsample_size=160,  # ...is brought to 160 px, then a 80x64 detail is cropped
    )
    by_key = {s.item.key: s for s in dm.scan()}
    assert by_key["big.png"].scale_to == (213, 160) and by_key["small.png"].scale_to is None
    ds = dm.train_dataloader().dataset
    big = ds[(list(by_key).index("big.png"), 0)]
    assert big["pixels"].shape == (3, 64, 80)
    assert big["crop_top_left"] == ((160 - 64) // 2, (213 - 80) // 2)  # a centre detail of the 213x160 image


def test_symlinked_folders_are_followed_and_unsupported_formats_reported(tmp_path):
    real, data = tmp_path / "elsewhere", tmp_path / "data"
    real.mkdir()
    data.mkdir()
    Image.new("RGB", (64, 64)).save(real / "linked.png")
    (data / "more").symlink_to(real, target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)  # a cycle is walked once
    Image.new("RGB", (64, 64)).save(data / "here.png")
    (data / "layers.psd").write_bytes(b"8BPS\0\1")
    (data / "notes.md").write_text("ignored")
    report = tmp_path / "r.json"
    dm = DiffusionDataModule(path=str(data), resolution=64, report_path=str(report))
    assert sorted(s.item.key for s in dm.scan()) == ["here.png", "more/linked.png"]
    skipped = json.loads(report.read_text())["skipped"]
    assert [Path(s["path"]).name for s in skipped] == ["layers.psd"] and "unsupported format" in skipped[0]["reason"]


def test_gif_bmp_tiff_avif_and_heic_are_read_and_the_report_says_how(tmp_path):
    """The formats users have: GIF (its first frame), BMP, TIFF, AVIF, and HEIC with pillow-heif (the heic
    extra, part of .[all]). The report names any format other than JPEG/PNG/WebP and the frame used."""
    data = tmp_path / "data"
    data.mkdir()
    red, green = Image.new("RGB", (64, 48), (250, 0, 0)), Image.new("RGB", (64, 48), (0, 250, 0))
    red.save(data / "animated.gif", save_all=True, append_images=[green, Image.new("RGB", (64, 48), (0, 0, 250))])
    green.save(data / "plain.bmp")
    red.save(data / "pages.tiff", save_all=True, append_images=[green])
    green.save(data / "photo.avif")
    red.save(data / "phone.heic", format="HEIF")
    red.save(data / "usual.png")
    report = tmp_path / "report.json"
    dm = DiffusionDataModule(path=str(data), resolution=64, bucket_step=16, report_path=str(report))
    assert len(dm.scan()) == 6
    formats = {Path(u["path"]).name: u.get("format") for u in json.loads(report.read_text())["usable"]}
    assert formats == {
        "animated.gif": "GIF, first of 3 frames",
        "plain.bmp": "BMP",
        "pages.tiff": "TIFF, first of 2 pages",
        "photo.avif": "AVIF",
        "phone.heic": "HEIF",
        "usual.png": None,
    }
    for name, colour in [("animated.gif", 0), ("pages.tiff", 0), ("phone.heic", 0), ("photo.avif", 1), ("plain.bmp", 1)]:
        with open(data / name, "rb") as f:
            pixels = np.asarray(load_rgb(f), dtype=np.float32).mean(axis=(0, 1))
        assert pixels.argmax() == colour and pixels.max() > 200, name  # the first frame, decoded


def test_heic_without_pillow_heif_is_skipped_with_the_extra_named(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pillow_heif'] = None\n"  # as if the heic extra were not installed
        "from datamodules.scan import probe_item\n"
        "from datamodules.sources import FolderSource\n"
        f"src = FolderSource({str(tmp_path)!r})\n"
        "print([probe_item(src, it)[0] for it in src.items()])"
    )
    Image.new("RGB", (8, 8)).save(tmp_path / "phone.heic", format="HEIF")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert "unsupported format (.heic) without pillow-heif" in out.stdout and ".[heic]" in out.stdout
