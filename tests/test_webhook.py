"""The webhook client against a Discord-like HTTP server on 127.0.0.1: real sockets, nothing patched."""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import logging
import pickle
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from PIL import Image

from callbacks.webhook import (
    WebhookCallback,
    WebhookConfig,
    WebhookSender,
    load_webhook_config,
)

TOKEN = "SECRET-TOKEN-0123456789abcdefXYZ"
FAST = {"backoff_base": 0.01, "backoff_max": 0.05, "request_timeout": 5.0}


class FakeDiscord:
    """Records every POST; answers from a script of responses, then 204."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: deque[dict] = deque()
        self.delay = 0.0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with owner.lock:
                    owner.requests.append(
                        {"t": time.monotonic(), "path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    action = owner.script.popleft() if owner.script else {"status": 204}
                if owner.delay:
                    time.sleep(owner.delay)
                payload = json.dumps(action["json"]).encode() if "json" in action else b""
                self.send_response(action["status"])
                for k, v in action.get("headers", {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                if payload:
                    self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep the test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/webhooks/42/{TOKEN}"

    def json_bodies(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests if r["headers"]["Content-Type"] == "application/json"]

    def wait_for(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def discord():
    server = FakeDiscord()
    yield server
    server.close()


@pytest.fixture
def records():
    """Every record of the ``callbacks.webhook`` logger at DEBUG (works with or without pytest's logging plugin)."""
    got: list[logging.LogRecord] = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            got.append(record)

    handler = ListHandler(level=logging.DEBUG)
    logger = logging.getLogger("callbacks.webhook")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield got
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def log_text(records) -> str:
    return "\n".join(r.getMessage() for r in records)


def config(url: str, **kw) -> WebhookConfig:
    return WebhookConfig(webhook_url=url, **kw)


def write_config(tmp_path, **data):
    path = tmp_path / "webhook.json"
    path.write_text(json.dumps(data))
    return path


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i * 10 % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ config
def test_load_config_defaults_and_values(tmp_path):
    cfg = load_webhook_config(write_config(tmp_path, webhook_url=f"https://discord.test/api/webhooks/1/{TOKEN}"))
    assert (cfg.webhook_type, cfg.message_prefix, cfg.log_level) == ("discord", None, "info")
    cfg = load_webhook_config(
        write_config(
            tmp_path, webhook_url="https://x.test/h", webhook_type="raw", message_prefix="box", log_level="CRITICAL"
        )
    )
    assert (cfg.webhook_type, cfg.message_prefix, cfg.log_level) == ("raw", "box", "critical")


@pytest.mark.parametrize(
    "data, key, valid",
    [
        ({}, "webhook_url", None),
        ({"webhook_url": f"ftp://host/{TOKEN}"}, "webhook_url", None),
        ({"webhook_url": f"https://h/{TOKEN}", "webhook_type": "slack"}, "webhook_type", "discord, raw"),
        (
            {"webhook_url": f"https://h/{TOKEN}", "log_level": "loud"},
            "log_level",
            "debug, info, warning, error, critical",
        ),
        ({"webhook_url": f"https://h/{TOKEN}", "message_prefix": 3}, "message_prefix", None),
        ({"webhook_url": f"https://h/{TOKEN}", "webhok_type": "raw"}, "webhok_type", "webhook_url"),
    ],
)
def test_config_errors_name_the_key_never_the_url(tmp_path, data, key, valid):
    with pytest.raises(ValueError) as info:
        load_webhook_config(write_config(tmp_path, **data))
    text = str(info.value)
    assert key in text
    if valid:
        assert valid in text
    assert TOKEN not in text


def test_config_bad_file(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        load_webhook_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"webhook_url": "https://h/' + TOKEN + '",')
    with pytest.raises(ValueError, match="not valid JSON") as info:
        load_webhook_config(bad)
    assert TOKEN not in str(info.value)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_webhook_config(bad)


# ------------------------------------------------------------------------------------------ sender
def test_plain_message_delivered_with_prefix(discord):
    sender = WebhookSender(config(discord.url, message_prefix="rig-1"), **FAST)
    assert sender.send("info", "hello @everyone")
    sender.close(5)
    (body,) = discord.json_bodies()
    assert body["content"] == "rig-1: hello @everyone"
    assert body["allowed_mentions"] == {"parse": []}
    assert discord.requests[0]["path"].endswith(TOKEN)
    assert (sender.sent, sender.dropped) == (1, 0)


def test_long_message_truncated_to_discord_limit(discord):
    sender = WebhookSender(config(discord.url, message_prefix="p"), **FAST)
    sender.send("info", "x" * 5000)
    sender.close(5)
    assert len(discord.json_bodies()[0]["content"]) == 2000


def test_raw_type_posts_plain_json_with_base64_images(discord):
    sender = WebhookSender(config(discord.url, webhook_type="raw", message_prefix="p"), **FAST)
    sender.send("warning", "note", [("a.png", png(1))])
    sender.close(5)
    (body,) = discord.json_bodies()
    assert (body["level"], body["message"], body["prefix"]) == ("warning", "note", "p")
    assert body["images"][0]["content_type"] == "image/png"


@pytest.mark.parametrize(
    "answer",
    [
        {"status": 429, "json": {"message": "You are being rate limited.", "retry_after": 0.4, "global": False}},
        {"status": 429, "headers": {"Retry-After": "1"}},
    ],
    ids=["json-body", "header"],
)
def test_429_retry_after_is_honoured(discord, answer):
    discord.script.append(answer)
    wait = answer.get("json", {}).get("retry_after") or float(answer["headers"]["Retry-After"])
    sender = WebhookSender(config(discord.url), **FAST)
    sender.send("info", "after the limit")
    sender.close(10)
    assert len(discord.requests) == 2
    assert discord.requests[1]["t"] - discord.requests[0]["t"] >= wait - 0.02
    assert (sender.sent, sender.dropped) == (1, 0)


def test_500_is_retried_then_delivered(discord):
    discord.script.extend([{"status": 500}, {"status": 502}])
    sender = WebhookSender(config(discord.url), **FAST)
    sender.send("info", "eventually")
    sender.close(5)
    assert len(discord.requests) == 3
    assert discord.json_bodies()[-1]["content"] == "eventually"
    assert (sender.sent, sender.dropped) == (1, 0)


def test_permanent_500_is_dropped_and_counted(discord, records):
    discord.script.extend([{"status": 500}] * 50)
    sender = WebhookSender(config(discord.url), max_retries=3, **FAST)
    t0 = time.monotonic()
    assert sender.send("error", "never arrives") is True  # queued: the caller neither blocks nor raises
    assert time.monotonic() - t0 < 0.05
    sender.close(5)
    assert len(discord.requests) == 4  # the first try and 3 retries
    assert (sender.sent, sender.dropped) == (0, 1)
    assert any("1 message(s) could not be delivered" in r.getMessage() for r in records)


def test_4xx_is_permanent(discord):
    discord.script.append({"status": 404, "json": {"message": "Unknown Webhook"}})
    sender = WebhookSender(config(discord.url), **FAST)
    sender.send("info", "gone")
    sender.close(5)
    assert len(discord.requests) == 1
    assert sender.dropped == 1


def test_queue_overflow_drops_without_blocking(discord):
    discord.delay = 0.3  # a slow Discord
    sender = WebhookSender(config(discord.url), max_queue=3, **FAST)
    t0 = time.monotonic()
    results = [sender.send("info", f"m{i}") for i in range(30)]
    elapsed = time.monotonic() - t0
    assert elapsed < 0.2, elapsed
    assert results.count(False) >= 26
    assert sender.dropped >= 26
    t0 = time.monotonic()
    sender.close(0.1)
    assert time.monotonic() - t0 < 2.0
    assert sender.dropped + sender.sent <= 30
    assert sender.dropped >= 27  # the rest of the queue could not go out in time


def test_level_filtering(discord):
    sender = WebhookSender(config(discord.url, log_level="warning"), **FAST)
    sender.send("debug", "noise")
    sender.send("info", "chatter")
    sender.send("error", "important")
    sender.send(logging.CRITICAL, "fatal")
    sender.close(5)
    assert [b["content"] for b in discord.json_bodies()] == ["important", "fatal"]
    assert (sender.sent, sender.dropped, sender.filtered) == (2, 0, 2)


def test_23_images_become_3_multipart_messages(discord):
    sender = WebhookSender(config(discord.url, message_prefix="val"), **FAST)
    images = [(f"prompt one {i}.png", png(i)) for i in range(23)]
    sender.send("info", "a cat", images)
    sender.close(5)
    assert len(discord.requests) == 3
    counts = []
    for n, req in enumerate(discord.requests):
        content_type = req["headers"]["Content-Type"]
        assert content_type.startswith("multipart/form-data; boundary=")
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + req["body"]
        )
        parts = list(msg.iter_parts())
        assert parts[0].get_param("name", header="content-disposition") == "payload_json"
        payload = json.loads(parts[0].get_content())
        assert payload["content"] == f"val: a cat ({n + 1}/3)"
        files = parts[1:]
        assert [f.get_param("name", header="content-disposition") for f in files] == [
            f"files[{i}]" for i in range(len(files))
        ]
        assert len(payload["attachments"]) == len(files)
        for f in files:
            data = f.get_payload(decode=True)
            assert data.startswith(b"\x89PNG")
            Image.open(io.BytesIO(data)).verify()
            assert f.get_filename().endswith(".png") and " " not in f.get_filename()
        counts.append(len(files))
    assert counts == [10, 10, 3]


def test_connection_errors_retry_then_drop_without_leaking_the_url(records):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api/webhooks/42/{TOKEN}"
    sender = WebhookSender(config(url), max_retries=2, **FAST)
    sender.send("info", f"the url is {url}")
    sender.close(5)
    assert sender.dropped == 1
    text = log_text(records)
    assert "giving up after 2 retries" in text
    assert TOKEN not in text and url not in text


def test_url_never_in_logs_repr_or_state(discord, records, tmp_path):
    path = write_config(tmp_path, webhook_url=discord.url, message_prefix="p", log_level="debug")
    discord.script.extend([{"status": 500}, {"status": 429, "json": {"retry_after": 0.01}}, {"status": 400}])
    cb = WebhookCallback(path, status_every_n_steps=1)
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, current_epoch=0, optimizers=[], callback_metrics={})
    cb.setup(trainer, None, "fit")
    cb._sender.backoff_base = 0.01
    cb.notify("one")
    cb.notify("two")
    for obj in (cb, cb.config, cb._sender, cb.state_dict()):
        assert TOKEN not in repr(obj) and TOKEN not in str(obj)
    cb.teardown(trainer, None, "fit")
    assert TOKEN not in log_text(records)
    assert TOKEN not in json.dumps(cb.state_dict())
    assert set(cb.state_dict()) == {"sent", "dropped"}
    assert cb.state_dict() == {"sent": 1, "dropped": 1}
    assert TOKEN not in repr(pickle.loads(pickle.dumps(cb)))


# ------------------------------------------------------------------------------------------ callback
def test_callback_without_optimizers_or_metrics_and_off_rank_zero(discord):
    cb = WebhookCallback(config(discord.url), status_every_n_steps=2)
    bare = SimpleNamespace(is_global_zero=True, global_step=2, current_epoch=0, optimizers=[], callback_metrics={})
    cb.setup(bare, None, "fit")
    cb.on_train_batch_end(bare, None, None, None, 0)
    cb.on_train_batch_end(bare, None, None, None, 1)  # same step (gradient accumulation): reported once
    cb.teardown(bare, None, "fit")
    assert [b["content"] for b in discord.json_bodies()] == ["epoch 0 | step 2 | loss n/a | lr n/a"]

    other = WebhookCallback(config(discord.url), status_every_n_steps=1)
    rank1 = SimpleNamespace(is_global_zero=False, global_step=1, current_epoch=0, optimizers=[], callback_metrics={})
    other.setup(rank1, None, "fit")
    assert other._sender is None
    other.on_train_batch_end(rank1, None, None, None, 0)
    assert other.send_images("t", [("a.png", png(0))]) is False
    assert len(discord.requests) == 1


class LoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"], on_step=True, on_epoch=True)
        self.log("ema/decay", 0.999, on_step=True)
        return out


class FailingModel(LoggingModel):
    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("boom at step three")
        return super().training_step(batch, batch_idx)


def run_fit(model, cb, tmp_path):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[cb],
    )
    trainer.fit(model)


def test_callback_in_a_real_lightning_run(discord, tmp_path):
    torch.manual_seed(0)
    summary = {"model": "boring", "max_train_steps": 6, "lr": 0.1, "batch_size": 2, "dataset_size": 64}
    path = write_config(tmp_path, webhook_url=discord.url, message_prefix="ci")
    cb = WebhookCallback(path, status_every_n_steps=2, run_summary=summary)
    run_fit(LoggingModel(), cb, tmp_path)
    contents = [b["content"] for b in discord.json_bodies()]
    assert len(contents) == 5, contents
    start, *rest = contents
    # "complete" may overtake a status line still queued: it is sent ahead of any backlog.
    (done,) = [c for c in rest if "Training complete" in c]
    status = [c for c in rest if c != done]
    assert start.startswith("ci: **Training started**")
    for key in ("model: boring", "max_train_steps: 6", "lr: 0.1", "batch_size: 2", "dataset_size: 64", "max_steps=6"):
        assert key in start
    assert [s.split(" | ")[1] for s in status] == ["step 2/6", "step 4/6", "step 6/6"]
    for s in status:
        assert s.startswith("ci: epoch 0 | ") and "loss n/a" not in s and "lr 0.1" in s and "ema decay 0.999" in s
    assert done.startswith("ci: **Training complete** at step 6")
    assert cb.state_dict() == {"sent": 5, "dropped": 0}


def test_callback_reports_a_fatal_error_with_traceback(discord, tmp_path):
    cb = WebhookCallback(config(discord.url, log_level="critical"), status_every_n_steps=2)
    with pytest.raises(RuntimeError, match="boom at step three"):
        run_fit(FailingModel(), cb, tmp_path)
    (fatal,) = [b["content"] for b in discord.json_bodies()]  # only the critical message passes the filter
    assert fatal.startswith("**Training failed** at step 3: RuntimeError: boom at step three")
    block = fatal.split("```\n", 1)[1]
    lines = block.rstrip("`\n").splitlines()
    assert 0 < len(lines) <= 15
    assert "training_step" in block and lines[-1] == "RuntimeError: boom at step three"
    assert len(fatal) <= 2000
