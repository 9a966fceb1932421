"""The metadata-table source: jsonl/csv/parquet tables, local paths and URLs fetched from a real local server."""

from __future__ import annotations

import csv
import io
import json
import pickle
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from datamodules import DiffusionDataModule, EmptyDatasetError, source_table
from datamodules.source_table import TableSource, url_cache_path
from datamodules.sources import SourceError, infer_type, open_source


def png_bytes(size: tuple[int, int], color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    return path


def write_parquet(path: Path, rows: list[dict], columns: list[str]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({c: pa.array([r.get(c) for r in rows], type=pa.string()) for c in columns})
    pq.write_table(table, path)
    return path


class Server:
    """A tiny HTTP server: fixed images, a 404, and a URL that fails with 500 once before it works."""

    def __init__(self):
        self.files = {
            "/a.png": png_bytes((64, 64), "red"),
            "/b.png": png_bytes((64, 64), "green"),
            "/flaky.png": png_bytes((64, 64), "blue"),
        }
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with server.lock:
                    server.hits[self.path] += 1
                    n = server.hits[self.path]
                if self.path == "/flaky.png" and n == 1:
                    self.send_error(500)
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(source_table, "_BACKOFF_S", 0.01)  # keep the retry test fast
    s = Server()
    yield s
    s.close()


@pytest.fixture
def local_rows(tmp_path) -> list[dict]:
    """Images under tmp_path/data/imgs, named relative to the table's folder, plus one absolute path."""
    imgs = tmp_path / "data" / "imgs"
    imgs.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(imgs / "red.png")
    Image.new("RGB", (64, 64), "blue").save(imgs / "blue.jpg")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (64, 64), "white").save(elsewhere / "white.png")
    return [
        {"image": "imgs/red.png", "caption": "a red square"},
        {"image": "imgs/blue.jpg", "caption": "a blue square"},
        {"image": "", "caption": "no image: skipped"},
        {"image": str(elsewhere / "white.png"), "caption": None},
    ]


def tables(folder: Path, rows: list[dict]) -> list[Path]:
    columns = ["image", "caption"]
    return [
        write_jsonl(folder / "metadata.jsonl", rows),
        write_csv(folder / "metadata.csv", rows, columns),
        write_parquet(folder / "metadata.parquet", rows, columns),
    ]


def test_jsonl_csv_parquet_give_the_same_items(tmp_path, local_rows):
    data = tmp_path / "data"
    results = []
    for table in tables(data, local_rows):
        assert infer_type(str(table)) == "table"
        source = open_source(str(table), options={"image_column": "image", "caption_column": "caption"})
        assert isinstance(source, TableSource)
        results.append(list(source.items()))

    first = results[0]
    assert all(r == first for r in results[1:])
    assert [i.key for i in first] == ["imgs/red.png", "imgs/blue.jpg", local_rows[3]["image"]]
    assert [i.caption for i in first] == ["a red square", "a blue square", None]
    red = data / "imgs" / "red.png"
    st = red.stat()
    assert first[0].location == str(red)
    assert first[0].size == st.st_size and first[0].version == f"{st.st_mtime_ns}:{st.st_size}"
    with source.open(first[1]) as f:
        assert f.read() == (data / "imgs" / "blue.jpg").read_bytes()
    assert source.sidecar(first[0]) is None


def test_default_columns_and_missing_files(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    table = write_jsonl(
        tmp_path / "metadata.jsonl",
        [{"file_name": "x.png", "text": "  an x  "}, {"file_name": "gone.png", "text": 3}, {"text": "no file"}],
    )
    # None options fall back to the imagefolder defaults.
    items = list(TableSource(str(table), {"image_column": None, "caption_column": None}).items())
    assert [(i.key, i.caption) for i in items] == [("x.png", "an x"), ("gone.png", "3")]
    assert items[1].size == -1  # a missing file is kept, so the scan reports it


def test_urls_download_once_retry_and_report_failures(tmp_path, server):
    table = write_jsonl(
        tmp_path / "urls.jsonl",
        [
            {"file_name": server.url("/a.png"), "text": "from a"},
            {"file_name": server.url("/b.png"), "text": "from b"},
            {"file_name": server.url("/flaky.png"), "text": "flaky"},
            {"file_name": server.url("/missing.png"), "text": "missing"},
        ],
    )
    cache = tmp_path / "cache"

    def scan():
        dm = DiffusionDataModule(
            path=str(table),
            resolution=64,
            bucket_step=16,
            caption_strategy="column",
            cache_dir=str(cache),
            report_path=str(tmp_path / "r.json"),
        )
        return dm.scan(), json.loads((tmp_path / "r.json").read_text())

    samples, report = scan()
    assert [s.caption for s in samples] == ["from a", "from b", "flaky"]
    assert server.hits["/flaky.png"] == 2  # 500, then 200
    assert server.hits["/a.png"] == server.hits["/b.png"] == 1
    assert server.hits["/missing.png"] == 1  # a 404 is final: no retry
    [skipped] = report["skipped"]
    assert skipped["path"] == server.url("/missing.png") and "404" in skipped["reason"]

    cached = url_cache_path(cache, server.url("/a.png"))
    assert cached.parent == cache / "urls" and len(cached.stem) == 32 and cached.suffix == ".png"
    assert cached.read_bytes() == server.files["/a.png"]
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".part-")]

    # A new data module (new source object) reuses the cache: no second request for fetched URLs.
    samples, report = scan()
    assert [s.caption for s in samples] == ["from a", "from b", "flaky"]
    assert server.hits["/a.png"] == server.hits["/b.png"] == 1 and server.hits["/flaky.png"] == 2
    assert samples[0].item.size == len(server.files["/a.png"])


def test_urls_need_a_cache_dir(tmp_path, server):
    table = write_jsonl(tmp_path / "t.jsonl", [{"file_name": server.url("/a.png"), "text": "a"}])
    with pytest.raises(SourceError, match="cache_dir"):
        list(TableSource(str(table)).items())


def test_end_to_end_column_captions_and_batch(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = []
    for name, size in [("wide", (96, 48)), ("tall", (48, 96)), ("square", (64, 64))]:
        Image.new("RGB", size, "gray").save(imgs / f"{name}.png")
        rows.append({"file_name": f"imgs/{name}.png", "text": f"a {name} picture"})
    table = write_csv(tmp_path / "metadata.csv", rows, ["file_name", "text"])

    dm = DiffusionDataModule(
        path=str(table),
        resolution=64,
        bucket_step=16,
        caption_strategy="column",
        cache_dir=str(tmp_path / "cache"),
        report_path=str(tmp_path / "r.json"),
    )
    samples = dm.scan()
    assert {s.caption for s in samples} == {"a wide picture", "a tall picture", "a square picture"}
    by_caption = {s.caption: s.bucket for s in samples}
    batch = next(iter(dm.train_dataloader()))
    (w, h) = by_caption[batch["captions"][0]]
    assert tuple(batch["pixels"].shape) == (1, 3, h, w)


def test_missing_column_bad_json_and_pickling(tmp_path, local_rows):
    for table in tables(tmp_path / "data", local_rows):
        dm = DiffusionDataModule(path=str(table), caption_strategy="column", image_column="path")
        with pytest.raises(EmptyDatasetError) as err:
            dm.scan()
        message = str(err.value)
        assert "'path'" in message and "'image'" in message and "'caption'" in message and str(table) in message

    source = TableSource(str(table), {"image_column": "image", "caption_column": "caption"})
    clone = pickle.loads(pickle.dumps(source))
    assert list(clone.items()) == list(source.items())

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file_name": "a.png"}\n\n{not json\n')
    with pytest.raises(SourceError, match="line 3"):
        list(TableSource(str(bad)).items())

    for missing in (tmp_path / "nope.csv", tmp_path / "table.txt"):
        with pytest.raises(SourceError, match=str(missing.name)):
            list(TableSource(str(missing)).items())


def test_connection_errors_are_retried_then_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(source_table, "_BACKOFF_S", 0.01)
    sleeps = []
    monkeypatch.setattr(source_table.time, "sleep", sleeps.append)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.jpg"
    dest = url_cache_path(tmp_path, url)
    with pytest.raises(source_table.DownloadError, match="download failed"):
        source_table.download(url, dest)
    assert sleeps == [0.01, 0.02]  # three attempts, exponential backoff
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_a_failed_fetch_is_tried_again_on_the_next_scan(tmp_path, server):
    """A download that fails is reported, but not remembered by the scan cache: the next scan retries it."""
    table = write_jsonl(tmp_path / "t.jsonl", [{"file_name": server.url("/late.png"), "text": "late"}])

    def scan():
        dm = DiffusionDataModule(
            path=str(table), resolution=64, caption_strategy="column", cache_dir=str(tmp_path / "cache")
        )
        try:
            return dm.scan()
        except EmptyDatasetError:
            return []

    assert scan() == []  # 404 for now
    server.files["/late.png"] = png_bytes((64, 64), "red")  # the file appears
    assert [s.caption for s in scan()] == ["late"]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_tables_captions_come_from_its_caption_column_unless_told_otherwise(tmp_path, kind):
    (tmp_path / "img 000.png").write_bytes(png_bytes((64, 64), "red"))
    rows = [{"file_name": "img 000.png", "text": "a red square"}]
    table = write_jsonl(tmp_path / "t.jsonl", rows) if kind == "jsonl" else write_csv(tmp_path / "t.csv", rows, ["file_name", "text"])
    scan = lambda **keys: DiffusionDataModule(path=str(table), resolution=64, bucket_step=16, **keys).scan()  # noqa: E731
    assert [s.caption for s in scan()] == ["a red square"]  # no caption_strategy: the table's column
    assert [s.caption for s in scan(caption_strategy="filename")] == ["img 000"]  # asked for: the file name

    bare = [{"file_name": "img 000.png", "prompt": "a red square"}]
    table = write_jsonl(tmp_path / "b.jsonl", bare) if kind == "jsonl" else write_csv(tmp_path / "b.csv", bare, ["file_name", "prompt"])
    with pytest.raises(EmptyDatasetError, match="no caption column 'text' .*its columns: 'file_name', 'prompt'"):
        scan()
    assert [s.caption for s in scan(caption_column="prompt")] == ["a red square"]
