"""The webhook at exit: "training complete" goes ahead of any backlog, and the wait for a hanging server
is bounded (callbacks.webhook.exit_timeout), in process and in a real run. Real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from test_webhook import FAST, TOKEN, FakeDiscord, config

from callbacks.webhook import WebhookSender


@pytest.fixture
def server():
    discord = FakeDiscord()
    yield discord
    discord.close()


def test_completion_goes_ahead_of_the_backlog(server):
    discord = server
    discord.delay = 0.2
    sender = WebhookSender(config(discord.url), **FAST)
    for i in range(4):
        sender.send("info", f"status {i}")
    discord.wait_for(1)  # the first is in flight
    sender.send("info", "Training complete", urgent=True)
    sender.close(timeout=10)
    texts = [b["content"] for b in discord.json_bodies()]
    assert texts == ["status 0", "Training complete", "status 1", "status 2", "status 3"]


def test_completion_interrupts_a_retry_backoff_and_the_retry_follows(server):
    discord = server
    discord.script.append({"status": 500})
    sender = WebhookSender(config(discord.url), backoff_base=1.0, request_timeout=5.0)
    sender.send("info", "status 0")
    discord.wait_for(1)
    started = time.monotonic()
    sender.send("info", "Training complete", urgent=True)
    discord.wait_for(2)
    assert time.monotonic() - started < 0.5  # it did not wait out the 1 s backoff of the failed one
    sender.close(timeout=10)
    assert [b["content"] for b in discord.json_bodies()] == ["status 0", "Training complete", "status 0"]
    assert sender.sent == 2 and sender.dropped == 0


class BlackHole:
    """Accepts connections on 127.0.0.1 and never answers: a webhook host that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.accepted: list[float] = []
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/api/webhooks/7/{TOKEN}"

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            self.conns.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_close_waits_no_longer_than_its_timeout_on_a_hanging_server():
    hole = BlackHole()
    try:
        sender = WebhookSender(config(hole.url))  # request timeout 10 s, as in a run
        sender.send("info", "hello")
        sender.send("info", "Training complete", urgent=True)
        time.sleep(0.2)
        started = time.monotonic()
        sender.close(timeout=1.0)
        assert time.monotonic() - started < 1.5
        assert sender.dropped == 2 and sender.sent == 0
    finally:
        hole.close()


@pytest.mark.slow
def test_a_run_exits_promptly_with_a_hanging_webhook(demo_dir, tmp_path):
    """Real process, real socket: the run's exit waits about callbacks.webhook.exit_timeout, not 10 s."""
    from conftest import ROOT, run_cli

    hole = BlackHole()
    hook = tmp_path / "webhook.json"
    hook.write_text(json.dumps({"webhook_url": hole.url}))
    try:
        result = run_cli(
            str(ROOT / "train.py"),
            f"output_dir={tmp_path / 'out'}",
            f"demo_assets_dir={demo_dir}",
            f"callbacks.webhook.config={hook}",
            "callbacks.validation.enabled=false",
            "callbacks.ema.enabled=false",
            "max_train_steps=3",
            "trainer.enable_progress_bar=false",
        )
        ended = time.monotonic()
    finally:
        hole.close()
    assert result.returncode == 0, result.stderr[-3000:]
    assert hole.accepted, "the run never reached the webhook"
    # From the startup message (fit start) to the process's end: 3 tiny steps, the export and the
    # 2 s exit wait. Before the bound it was over 10 s.
    assert ended - hole.accepted[0] < 7.0
    dropped = [line for line in result.stderr.splitlines() if "could not be delivered and were dropped" in line]
    assert len(dropped) == 1 and TOKEN not in result.stderr
