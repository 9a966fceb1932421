"""The S3 source against a real (in-process) S3 server: moto's, so the HTTP, signing, pagination and
error paths are boto3's own, not mocks."""

from __future__ import annotations

import io
import json
import pickle

import pytest
from PIL import Image

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from datamodules import DiffusionDataModule, EmptyDatasetError  # noqa: E402
from datamodules.buckets import bucket_for  # noqa: E402
from datamodules.source_s3 import S3Source  # noqa: E402
from datamodules.sources import SourceError, open_source  # noqa: E402

BUCKET = "tuner-data"
PREFIX = "set/"
KEY_ID, SECRET = "testing-key", "testing-secret"


def _image(size: tuple[int, int], fmt: str, color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


# Relative key -> (bytes, (w, h)) for the usable images.
IMAGES = {
    "a_red_square.png": (_image((64, 64), "PNG", (200, 0, 0)), (64, 64)),
    "b_wide.jpg": (_image((96, 48), "JPEG", (0, 200, 0)), (96, 48)),
    "sub/c_tall_blue.png": (_image((40, 80), "PNG", (0, 0, 200)), (40, 80)),
}
SIDECARS = {"a_red_square.txt": b"a red square\n", "sub/c_tall_blue.txt": b"\xef\xbb\xbfa tall blue bar\n"}
TRUNCATED = "broken.jpg"
OTHERS = {
    "notes.json": b"{}",  # not an image
    ".hidden.png": _image((32, 32), "PNG", (1, 1, 1)),  # hidden
    ".cache/d.png": _image((32, 32), "PNG", (1, 1, 1)),  # in a hidden folder
    "orphan.txt": b"a caption without an image",
}


@pytest.fixture(scope="module")
def server():
    """A moto S3 server on a free port, with one bucket holding the test set (and decoys around it)."""
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    url = f"http://{host}:{port}"
    s3 = boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET
    )
    s3.create_bucket(Bucket=BUCKET)
    etags = {}
    for key, (data, _) in IMAGES.items():
        etags[key] = s3.put_object(Bucket=BUCKET, Key=PREFIX + key, Body=data)["ETag"].strip('"')
    for key, data in {**SIDECARS, **OTHERS}.items():
        s3.put_object(Bucket=BUCKET, Key=PREFIX + key, Body=data)
    jpeg = _image((64, 64), "JPEG", (9, 9, 9))
    s3.put_object(Bucket=BUCKET, Key=PREFIX + TRUNCATED, Body=jpeg[: len(jpeg) // 2])
    # Outside the prefix, and under a sibling prefix that merely starts with the same letters.
    s3.put_object(Bucket=BUCKET, Key="elsewhere.png", Body=IMAGES["a_red_square.png"][0])
    s3.put_object(Bucket=BUCKET, Key="settings/e.png", Body=IMAGES["a_red_square.png"][0])
    yield {"url": url, "etags": etags, "truncated_size": len(jpeg) // 2}
    srv.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Fake credentials through the standard environment chain, and nothing else to find."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_lists_opens_and_reads_sidecars(server):
    source = open_source(f"s3://{BUCKET}/{PREFIX}", options={"endpoint_url": server["url"], "cache_dir": None})
    assert isinstance(source, S3Source)
    assert server["url"] in source.identity()
    gets = []
    source._s3().meta.events.register(
        "provide-client-params.s3.GetObject", lambda params, **_: gets.append(params["Key"])
    )

    items = list(source.items())
    assert [i.key for i in items] == sorted([*IMAGES, TRUNCATED])
    by_key = {i.key: i for i in items}
    for key, (data, _) in IMAGES.items():
        item = by_key[key]
        assert item.location == f"s3://{BUCKET}/{PREFIX}{key}"
        assert item.size == len(data)
        assert item.version == server["etags"][key]
        with source.open(item) as fp:
            assert fp.read() == data
    assert by_key[TRUNCATED].size == server["truncated_size"]

    assert source.sidecar(by_key["a_red_square.png"]) == SIDECARS["a_red_square.txt"]
    assert source.sidecar(by_key["sub/c_tall_blue.png"]) == SIDECARS["sub/c_tall_blue.txt"]
    gets.clear()
    assert source.sidecar(by_key["b_wide.jpg"]) is None
    assert gets == []  # a sidecar absent from the listing is not fetched

    # Picklable after use (DataLoader workers), and the copy opens again with a client of its own.
    copy = pickle.loads(pickle.dumps(source))
    with copy.open(by_key["b_wide.jpg"]) as fp:
        assert fp.read() == IMAGES["b_wide.jpg"][0]


def test_bucket_root_without_prefix(server):
    source = S3Source(f"s3://{BUCKET}", {"endpoint_url": server["url"]})
    keys = [i.key for i in source.items()]
    assert "elsewhere.png" in keys and "settings/e.png" in keys and f"{PREFIX}b_wide.jpg" in keys
    assert not any(k.rsplit("/", 1)[-1].startswith(".") for k in keys)
    # Without a trailing slash the prefix is still a folder: 'set' does not take in 'settings/'.
    keys = [i.key for i in S3Source(f"s3://{BUCKET}/set", {"endpoint_url": server["url"]}).items()]
    assert keys == sorted([*IMAGES, TRUNCATED])


def test_datamodule_end_to_end(server, tmp_path):
    report = tmp_path / "r.json"
    dm = DiffusionDataModule(
        path=f"s3://{BUCKET}/{PREFIX}",
        endpoint_url=server["url"],
        resolution=64,
        bucket_step=16,
        caption_strategy="textfile",
        report_path=str(report),
    )
    samples = dm.scan()
    got = {s.item.key: (s.caption, s.bucket) for s in samples}
    assert got == {
        "a_red_square.png": ("a red square", bucket_for(64, 64, 64, "area", 16)),
        "b_wide.jpg": ("b wide", bucket_for(96, 48, 64, "area", 16)),
        "sub/c_tall_blue.png": ("a tall blue bar", bucket_for(40, 80, 64, "area", 16)),
    }
    skipped = json.loads(report.read_text())["skipped"]
    assert [s["path"] for s in skipped] == [f"s3://{BUCKET}/{PREFIX}{TRUNCATED}"]
    assert "truncated JPEG" in skipped[0]["reason"]

    batch = next(iter(dm.train_dataloader()))
    (caption,) = batch["captions"]
    w, h = next(bucket for cap, bucket in got.values() if cap == caption)
    assert tuple(batch["pixels"].shape) == (1, 3, h, w)
    pickle.dumps(dm.sources)


def test_masks_on_s3_pair_with_their_images_by_stem(server, tmp_path):
    s3 = boto3.client("s3", endpoint_url=server["url"], region_name="us-east-1")
    white = _image((64, 64), "PNG", (255, 255, 255))
    for key in ("a_red_square.png", "b_wide.png"):  # b_wide.jpg's mask is a PNG: the stem pairs them
        s3.put_object(Bucket=BUCKET, Key=f"masks/{key}", Body=white)
    report = tmp_path / "r.json"
    dm = DiffusionDataModule(
        path=f"s3://{BUCKET}/{PREFIX}",
        endpoint_url=server["url"],
        resolution=64,
        bucket_step=16,
        conditioning={"mask": {"path": f"s3://{BUCKET}/masks/"}},
        report_path=str(report),
    )
    samples = dm.scan()
    assert {s.item.key: s.companions[0].item.location for s in samples} == {
        "a_red_square.png": f"s3://{BUCKET}/masks/a_red_square.png",
        "b_wide.jpg": f"s3://{BUCKET}/masks/b_wide.png",
    }
    skipped = {s["path"]: s["reason"] for s in json.loads(report.read_text())["skipped"]}
    assert skipped[f"s3://{BUCKET}/{PREFIX}sub/c_tall_blue.png"].startswith("no mask image")
    for batch in dm.train_dataloader():  # read over S3, brought to the image's bucket: all white, all trains
        assert batch["mask"].shape[-2:] == batch["pixels"].shape[-2:] and bool((batch["mask"] == 1).all())


def test_missing_bucket_is_a_clear_error(server):
    dm = DiffusionDataModule(path="s3://no-such-tuner-bucket/x/", endpoint_url=server["url"])
    with pytest.raises(EmptyDatasetError, match="no-such-tuner-bucket") as info:
        dm.scan()
    assert "does not exist" in str(info.value)
    assert isinstance(info.value.__cause__, SourceError)
    pickle.dumps(dm.sources["default"])


def test_no_credentials_is_a_clear_error(server, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    source = S3Source(f"s3://{BUCKET}/{PREFIX}", {"endpoint_url": server["url"]})
    with pytest.raises(SourceError, match="no AWS credentials") as info:
        list(source.items())
    assert BUCKET in str(info.value)


@pytest.mark.parametrize("path", ["s3://", "s3:///prefix"])
def test_path_without_bucket(path):
    with pytest.raises(SourceError, match="no bucket"):
        S3Source(path)


def _noise_clip(path, frames: int = 160, fps: int = 24, side: int = 128) -> None:
    """An mp4 of random frames (incompressible, so the object is megabytes), at a high bitrate, a keyframe every 24."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = side
        stream.pix_fmt, stream.bit_rate, stream.gop_size = "yuv420p", 40_000_000, 24
        for _ in range(frames):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_a_clip_on_s3_is_probed_and_decoded_by_ranged_reads_not_downloaded_whole(server, tmp_path):
    pytest.importorskip("av")
    import numpy as np

    from datamodules.scan import probe_item
    from datamodules.source_s3 import ObjectStream
    from datamodules.video import decode, probe_clip

    local = tmp_path / "long.mp4"
    _noise_clip(local)
    s3 = boto3.client("s3", endpoint_url=server["url"], region_name="us-east-1")
    s3.create_bucket(Bucket="tuner-clips")
    s3.put_object(Bucket="tuner-clips", Key="clips/long.mp4", Body=local.read_bytes())
    source = S3Source("s3://tuner-clips/clips/", {"endpoint_url": server["url"]})
    (item,) = source.items()
    assert item.size > 3_000_000

    with source.open(item) as fp:  # the probe: the headers at both ends, not the frames between
        assert isinstance(fp, ObjectStream)
        width, height, clip = probe_clip(fp)
        probed = fp.fetched
    with local.open("rb") as f:
        assert (width, height, clip) == (128, 128, probe_clip(f)[2]) and clip.frames == 160
    assert probed < item.size / 5, (probed, item.size)
    assert probe_item(source, item)[0][:2] == (128, 128)

    window = list(range(140, 149))  # 9 frames near the end: a seek to their keyframe, then a stream
    with source.open(item) as fp:
        frames = decode(fp, clip, window, lambda image: image)
        decoded, requests = fp.fetched, fp.requests
    with local.open("rb") as f:
        expected = decode(f, clip, window, lambda image: image)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, expected, strict=True))
    assert decoded < item.size / 2 and requests < 12, (decoded, requests, item.size)
    print(f"s3 clip {item.size} bytes: probe fetched {probed}, a 9-frame window {decoded} in {requests} GETs")

    # the object replaced between the listing and the read: refused, not two versions mixed
    s3.put_object(Bucket="tuner-clips", Key="clips/long.mp4", Body=local.read_bytes()[:-1])
    with pytest.raises(OSError, match="changed while it was read"), source.open(item) as fp:
        probe_clip(fp)
