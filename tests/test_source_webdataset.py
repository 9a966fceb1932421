"""Webdataset shards read in place: indexing, exact bytes, sidecars, and a full scan through the datamodule."""

import gzip
import io
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from datamodules import DiffusionDataModule, EmptyDatasetError
from datamodules.buckets import bucket_for
from datamodules.source_webdataset import WebDatasetSource, split_key
from datamodules.sources import SourceError, infer_type, open_source


def _image(fmt: str, size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


# (shard, key, ext, image size, sidecar fields, expected caption)
SAMPLES = [
    ("shard-000.tar", "a/b/000123", "png", (96, 64), {"txt": b"a red cube\n"}, "a red cube"),
    ("shard-000.tar", "a/b/000124", "jpg", (64, 96), {"json": {"caption": "a blue sphere", "id": 7}}, "a blue sphere"),
    ("shard-001.tar", "no_caption", "png", (64, 64), {}, "no caption"),
    ("shard-002.tar", "000300", "jpg", (128, 64), {"txt": "café, wide".encode()}, "café, wide"),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """Three real shards; returns the folder and each image member's bytes by item key."""
    root = tmp_path_factory.mktemp("wds") / "shards"
    root.mkdir()
    per_shard: dict[str, list[dict]] = {}
    written: dict[str, bytes] = {}
    for i, (shard, key, ext, size, sidecar, _) in enumerate(SAMPLES):
        data = _image("PNG" if ext == "png" else "JPEG", size, (40 * i, 200 - 40 * i, 90))
        sample = {"__key__": key, ext: data}
        if "txt" in sidecar:
            sample["txt"] = sidecar["txt"]
        if "json" in sidecar:
            sample["json"] = json.dumps(sidecar["json"]).encode()
        per_shard.setdefault(shard, []).append(sample)
        written[f"{shard}/{key}.{ext}"] = data
    full = _image("JPEG", (80, 80), (10, 20, 30))
    truncated = full[: len(full) // 2]
    per_shard["shard-001.tar"].append({"__key__": "broken", "jpg": truncated, "txt": b"never used"})
    per_shard["shard-001.tar"].append({"__key__": ".hidden", "png": _image("PNG", (64, 64), (0, 0, 0))})
    written["shard-001.tar/broken.jpg"] = truncated
    for shard, samples in per_shard.items():
        _write_shard(root / shard, samples)
    return {"root": root, "written": written}


def _by_key(source) -> dict:
    return {item.key: item for item in source.items()}


def test_key_convention():
    assert split_key("a/b/000123.jpg") == ("a/b/000123", "jpg")
    assert split_key("a.b/c.seg.PNG") == ("a.b/c", "seg.png")
    assert split_key("plain") == ("plain", "")


def test_items_open_and_sidecars_for_file_folder_and_pattern(shards):
    root, written = shards["root"], shards["written"]
    single = list(WebDatasetSource(str(root / "shard-000.tar")).items())
    assert [i.key for i in single] == ["shard-000.tar/a/b/000123.png", "shard-000.tar/a/b/000124.jpg"]
    assert single[0].location == f"{root / 'shard-000.tar'}#a/b/000123.png"
    mtime_ns, size = (root / "shard-000.tar").stat().st_mtime_ns, (root / "shard-000.tar").stat().st_size
    assert single[0].version.startswith(f"{mtime_ns}:{size}:")
    assert single[0].version != single[1].version

    folder = WebDatasetSource(str(root))
    pattern = WebDatasetSource(str(root / "shard-{000..002}.tar"))
    expected_order = [f"{s}/{k}.{e}" for s, k, e, *_ in SAMPLES[:3]] + ["shard-001.tar/broken.jpg"]
    expected_order.append(f"{SAMPLES[3][0]}/{SAMPLES[3][1]}.{SAMPLES[3][2]}")
    for source in (folder, pattern):
        items = list(source.items())
        assert [i.key for i in items] == expected_order  # shard order, then member order; .hidden skipped
        for item in items:
            with source.open(item) as f:
                assert f.read() == written[item.key]
            assert item.size == len(written[item.key])

    items = _by_key(pattern)
    assert pattern.sidecar(items["shard-000.tar/a/b/000123.png"]) == b"a red cube\n"
    assert pattern.sidecar(items["shard-000.tar/a/b/000124.jpg"]) == b"a blue sphere"
    assert pattern.sidecar(items["shard-001.tar/no_caption.png"]) is None
    # A fresh (or unpickled) source indexes the shard on demand.
    assert WebDatasetSource(pattern.path).sidecar(items["shard-002.tar/000300.jpg"]) == "café, wide".encode()


def test_json_caption_fields_and_bad_json(tmp_path):
    shard = tmp_path / "j.tar"
    png = _image("PNG", (8, 8), (1, 2, 3))
    _write_shard(
        shard,
        [
            {"__key__": "p", "png": png, "json": json.dumps({"prompt": "from prompt", "text": "from text"}).encode()},
            {"__key__": "n", "png": png, "json": json.dumps({"caption": 3, "tags": ["x"]}).encode()},
            {"__key__": "b", "png": png, "json": b"{not json"},
            {"__key__": "t", "png": png, "txt": b"from txt", "json": json.dumps({"caption": "from json"}).encode()},
        ],
    )
    source = WebDatasetSource(str(shard))
    items = _by_key(source)
    assert source.sidecar(items["j.tar/p.png"]) == b"from text"  # caption, then text, then prompt
    assert source.sidecar(items["j.tar/n.png"]) is None  # no string caption field
    assert source.sidecar(items["j.tar/t.png"]) == b"from txt"  # .txt wins over .json
    with pytest.raises(UnicodeError, match="not valid JSON"):
        source.sidecar(items["j.tar/b.png"])


def test_infer_type(shards):
    root = shards["root"]
    assert infer_type(str(root / "shard-000.tar")) == "webdataset"
    assert infer_type(str(root / "shard-{000..002}.tar")) == "webdataset"
    assert infer_type(str(root)) == "webdataset"
    assert isinstance(open_source(str(root)), WebDatasetSource)


def test_end_to_end_scan_and_batch(shards, tmp_path):
    root = shards["root"]
    report_path = tmp_path / "r.json"
    dm = DiffusionDataModule(
        path=str(root / "shard-{000..002}.tar"),
        resolution=64,
        bucket_step=16,
        report_path=str(report_path),  # no caption_strategy: webdataset's own, the .txt/.json beside each image
    )
    samples = dm.scan()
    expected = {caption: bucket_for(*size, 64, "area", 16) for _, _, _, size, _, caption in SAMPLES}
    assert {s.caption: s.bucket for s in samples} == expected
    assert len(set(expected.values())) >= 3  # the sizes really span several buckets

    report = json.loads(report_path.read_text())
    assert [u["caption"] for u in report["usable"]] == [c for *_, c in SAMPLES]
    assert len(report["skipped"]) == 1
    assert report["skipped"][0]["path"] == f"{root / 'shard-001.tar'}#broken.jpg"
    assert "truncated JPEG" in report["skipped"][0]["reason"]

    batch = next(iter(dm.train_dataloader()))
    bw, bh = expected[batch["captions"][0]]
    assert batch["pixels"].shape == (1, 3, bh, bw)


def test_pattern_matching_nothing_names_the_path(tmp_path):
    pattern = str(tmp_path / "none-{000..003}.tar")
    with pytest.raises(EmptyDatasetError, match=r"none-\{000\.\.003\}\.tar.*matches no shard"):
        DiffusionDataModule(path=pattern, caption_strategy="textfile").scan()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no .tar shard"):
        list(WebDatasetSource(str(empty)).items())
    with pytest.raises(SourceError, match="does not exist"):
        list(WebDatasetSource(str(tmp_path / "missing.tar")).items())


def test_compressed_shards_are_refused(shards, tmp_path):
    raw = (shards["root"] / "shard-000.tar").read_bytes()
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(raw))
    for source in (open_source(str(tmp_path / "s.tar.gz"), "webdataset"), WebDatasetSource(str(tmp_path))):
        with pytest.raises(SourceError, match="compressed; only uncompressed .tar"):
            list(source.items())
    # Compressed but named .tar: detected by its magic number, the shard is skipped with that reason.
    (tmp_path / "disguised.tar").write_bytes(gzip.compress(raw))
    with pytest.raises(SourceError, match="disguised.tar: gzip-compressed"):
        list(WebDatasetSource(str(tmp_path / "disguised.tar")).items())


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_unreadable_shards_are_skipped_unless_none_is_readable(shards, tmp_path):
    shutil.copy(shards["root"] / "shard-002.tar", tmp_path / "b-good.tar")
    (tmp_path / "a-bad.tar").write_bytes(b"this is not a tar file" * 40)
    logger, handler = logging.getLogger("datamodules.source_webdataset"), _Collect()
    logger.addHandler(handler)  # a handler of its own: the run may disable pytest's logging plugin
    try:
        keys = [i.key for i in WebDatasetSource(str(tmp_path)).items()]
    finally:
        logger.removeHandler(handler)
    assert keys == ["b-good.tar/000300.jpg"]
    assert any("a-bad.tar" in m for m in handler.messages)
    (tmp_path / "b-good.tar").unlink()
    with pytest.raises(SourceError, match="no readable webdataset shard.*a-bad.tar"):
        list(WebDatasetSource(str(tmp_path)).items())


def test_cut_shard_keeps_its_members_and_shows_the_cut(shards, tmp_path):
    raw = (shards["root"] / "shard-000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    source = WebDatasetSource(str(cut))
    cut.write_bytes(raw)
    last = list(source.items())[-1]
    cut.write_bytes(raw[: int(last.version.split(":")[2]) + 100])  # into the last image's data
    items = list(source.items())
    assert [i.key for i in items] == ["cut.tar/a/b/000123.png", "cut.tar/a/b/000124.jpg"]
    with source.open(items[-1]) as f:
        assert len(f.read()) == 100  # the scan's truncation check then reports it


def test_rewritten_shard_is_looked_up_afresh(tmp_path):
    shard = tmp_path / "s.tar"
    first, second = _image("PNG", (8, 8), (1, 1, 1)), _image("PNG", (16, 8), (2, 2, 2))

    def rewrite(samples: list[dict], mtime_ns: int) -> None:
        _write_shard(shard, samples)
        os.utime(shard, ns=(mtime_ns, mtime_ns))  # tar sizes round up to 10 KiB: make the change visible

    rewrite([{"__key__": "x", "png": first}], 1_000_000_000)
    source = WebDatasetSource(str(shard))
    (item,) = source.items()
    rewrite([{"__key__": "pad", "png": first}, {"__key__": "x", "png": second}], 2_000_000_000)
    with source.open(item) as f:
        assert f.read() == second  # the offset moved; the member is found by name
    rewrite([{"__key__": "pad", "png": first}], 3_000_000_000)
    with pytest.raises(FileNotFoundError):
        source.open(item)


def test_source_pickles_without_its_index(shards):
    source = WebDatasetSource(str(shards["root"] / "shard-{000..002}.tar"))
    items = list(source.items())
    clone = pickle.loads(pickle.dumps(source))
    assert clone.path == source.path and clone._index == {}
    with clone.open(items[0]) as f:
        assert f.read() == shards["written"][items[0].key]


def test_same_named_shards_in_different_folders_keep_apart(tmp_path):
    for folder, size in (("laion", (64, 128)), ("coyo", (128, 64))):
        (tmp_path / folder).mkdir()
        _write_shard(tmp_path / folder / "00000.tar", [{"__key__": "000", "png": _image("PNG", size, (9, 9, 9))}])
    dm = DiffusionDataModule(path=str(tmp_path / "{laion,coyo}" / "00000.tar"), resolution=64, bucket_step=16)
    sizes = {s.item.key: (s.width, s.height) for s in dm.scan()}
    assert sizes == {"laion/00000.tar/000.png": (64, 128), "coyo/00000.tar/000.png": (128, 64)}
