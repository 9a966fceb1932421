"""Model card and Hub upload, against a small Hub HTTP API served on 127.0.0.1 (real sockets, real HfApi)."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning as L
import pytest
import yaml
from conftest import point_hub_at
from lightning.pytorch.demos.boring_classes import BoringModel
from PIL import Image

from callbacks.hub import HubUploadCallback
from callbacks.model_card import write_model_card

FAKE_TOKEN = "hf_FakeTokenForTests0123456789abcdef"
NAMESPACE = "tester"


# ----------------------------------------------------------------------------- a tiny Hub


class FakeHub:
    """Just enough of the Hub API for create_repo and upload_folder/upload_file; records every call."""

    def __init__(self):
        self.calls: list[dict] = []
        self.fail_commits = False
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                hub.handle(self)

            def do_POST(self):
                hub.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def calls_to(self, kind: str) -> list[dict]:
        with self.lock:
            return [c for c in self.calls if c["kind"] == kind]

    def commits(self) -> list[dict[str, bytes]]:
        """Files of each successful commit: {path_in_repo: content}."""
        return [c["files"] for c in self.calls_to("commit") if c["status"] == 200]

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        path = req.path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in req.headers.items()}
        call = {"method": req.command, "path": path, "headers": headers, "body": body, "kind": "other"}
        parts = path.strip("/").split("/")
        status, answer = 404, {"error": f"not served by the test hub: {req.command} {path}"}
        if req.command == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            call.update(kind="create", payload=payload)
            status, answer = 200, {"url": f"{self.url}/{payload.get('organization') or NAMESPACE}/{payload['name']}"}
        elif req.command == "POST" and path == "/api/validate-yaml":
            call["kind"] = "validate-yaml"
            status, answer = 200, {"errors": [], "warnings": []}
        elif req.command == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
            call["kind"] = "preupload"
            files = json.loads(body)["files"]
            status = 200
            answer = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        elif req.command == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = {
                item["value"]["path"]: base64.b64decode(item["value"]["content"])
                for item in lines
                if item["key"] == "file"
            }
            call.update(kind="commit", repo=f"{parts[2]}/{parts[3]}", header=lines[0], files=files)
            if self.fail_commits:
                status, answer = 500, {"error": "Internal Error (test)"}
            else:
                status, answer = (
                    200,
                    {"commitUrl": f"{self.url}/{parts[2]}/{parts[3]}/commit/{'0' * 40}", "commitOid": "0" * 40},
                )
        call["status"] = status
        with self.lock:
            self.calls.append(call)
        data = json.dumps(answer).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    server = FakeHub()
    # Anything that ignores the callback's endpoint lands here (and fails the test), never on the real Hub.
    point_hub_at(monkeypatch, server.url)
    yield server
    assert not server.calls_to("other"), [(c["method"], c["path"]) for c in server.calls_to("other")]
    server.close()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(f"{r.levelname} {r.name} {r.getMessage()}" for r in self.records)


@pytest.fixture
def logs():
    """Every log record at DEBUG and up (works with or without pytest's logging plugin)."""
    handler = _Records()
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub"), logging.getLogger("callbacks")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


# ----------------------------------------------------------------------------- helpers


def _png(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


class FakeExport(L.Callback):
    """Stands in for the checkpoint and export callbacks: whole step folders written atomically every
    ``every`` steps, validation images, and the final LoRA weights at the end."""

    def __init__(self, output_dir: Path, every: int):
        self.output_dir = output_dir
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, *args):
        step = trainer.global_step
        if step % self.every:
            return
        tmp = self.output_dir / "checkpoints" / f".tmp-{step}"
        tmp.mkdir(parents=True)
        (tmp / "checkpoint.ckpt").write_bytes(b"lightning state")
        (tmp / "tracker_state.json").write_text("{}")
        (tmp / "pytorch_lora_weights.safetensors").write_bytes(f"weights {step}".encode())
        os.replace(tmp, tmp.with_name(str(step)))
        _png(self.output_dir / "validation" / f"step_{step}" / "a_dog.png")

    def on_train_end(self, trainer, pl_module):
        (self.output_dir / "pytorch_lora_weights.safetensors").write_bytes(b"final weights")


def _fit(output_dir: Path, callback: HubUploadCallback, steps: int = 6, every: int = 2) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(output_dir),
        callbacks=[FakeExport(output_dir, every), callback],
    )
    trainer.fit(BoringModel())
    return trainer


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


CARD_INFO = {
    "family": "sdxl",
    "license": "openrail++",  # the run passes the family's declared licence
    "finetune": "lora",
    "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
    "instance_prompt": "a photo of sks dog",
    "steps": 6,
    "learning_rate": 1e-4,
    "optimizer": "torch.optim.AdamW",
    "lora_rank": 16,
    "lora_alpha": 8,
    "caption_dropout_probability": 0.1,
    "datasets": [{"name": "dogs", "images": 12, "buckets": [[1024, 1024]], "resolution": 1.0, "repeats": 2}],
}


# ----------------------------------------------------------------------------- model card


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_lora(tmp_path):
    for step in (10, 20):
        _png(tmp_path / "validation" / f"step_{step}" / "a_dog.png")
        _png(tmp_path / "validation" / f"step_{step}" / "grid.png")
    secrets = {
        "webhook_url": "https://discord.com/api/webhooks/123/SECRETWEBHOOK",
        "hf_token": FAKE_TOKEN,
        "notes": "https://example.com/hook?token=SECRETQUERY",
        "storage": {"secret_access_key": "SECRETS3KEY", "source": "s3://user:SECRETPASS@bucket/x"},
    }
    info = {**CARD_INFO, "repo_id": "me/sks-dog", "validation_prompts": {"a_dog": "a photo of sks dog"}, **secrets}
    text = write_model_card(tmp_path, info).read_text()

    meta = _front_matter(text)
    assert meta["base_model"] == CARD_INFO["base_model"]
    assert {"text-to-image", "diffusers", "lora", "sdxl"} <= set(meta["tags"])
    assert meta["license"] == "openrail++"
    assert meta["library_name"] == "diffusers" and meta["inference"] is True
    assert meta["instance_prompt"] == "a photo of sks dog"
    assert "| Caption dropout | 10% |" in text
    assert "| Learning rate | 0.0001 |" in text and "| Optimiser | AdamW |" in text
    assert "| LoRA rank / alpha | rank 16, alpha 8 |" in text
    assert "| dogs | 12 | 1024x1024 | 1 | 2 |" in text
    assert "](validation/step_20/a_dog.png)" in text and "](validation/step_20/grid.png)" in text
    assert "step_10" not in text
    assert "DiffusionPipeline.from_pretrained('stabilityai/stable-diffusion-xl-base-1.0'" in text
    assert "pipe.load_lora_weights('me/sks-dog')" in text
    for secret in ("SECRETWEBHOOK", FAKE_TOKEN, "SECRETQUERY", "SECRETS3KEY", "SECRETPASS"):
        assert secret not in text


def test_model_card_shows_the_familys_notes(tmp_path):
    notes = ["Sample with `DDPMScheduler(variance_type='fixed_small')`.", "A second paragraph."]
    text = write_model_card(tmp_path, {**CARD_INFO, "family_notes": notes}).read_text()
    section = text.split("## Notes\n\n", 1)[1].split("\n## ", 1)[0]
    assert section.strip() == "\n\n".join(notes)
    assert "## Notes" not in write_model_card(tmp_path / "none", dict(CARD_INFO)).read_text()


def test_model_card_full_and_missing_keys(tmp_path):
    text = write_model_card(tmp_path, {"finetune": "full", "repo_id": "me/full", "family": "sd15"}).read_text()
    meta = _front_matter(text)
    assert meta["license"] == "other" and "full" in meta["tags"]  # no licence given: "see the base model"
    assert "base_model" not in meta  # unknown: left out rather than invalid metadata
    assert "DiffusionPipeline.from_pretrained('me/full'" in text and "load_lora_weights" not in text
    assert "| Learning rate | — |" in text and "| LoRA rank / alpha | full |" in text

    text = write_model_card(tmp_path / "empty", None).read_text()
    assert _front_matter(text)["library_name"] == "diffusers"
    assert "| Caption dropout | — |" in text


# ----------------------------------------------------------------------------- upload callback


def test_pushes_checkpoints_and_final(hub, logs, tmp_path):
    out = tmp_path / "out"
    cb = HubUploadCallback(out, "sks-dog", private=True, endpoint=hub.url, backoff_s=0.01, card_info=dict(CARD_INFO))
    trainer = _fit(out, cb, steps=6, every=2)

    creates = hub.calls_to("create")
    assert len(creates) == 1 and creates[0]["payload"]["name"] == "sks-dog"
    assert creates[0]["payload"].get("visibility") == "private" or creates[0]["payload"].get("private") is True
    assert cb.repo_id == f"{NAMESPACE}/sks-dog"
    assert {c["repo"] for c in hub.calls_to("commit")} == {f"{NAMESPACE}/sks-dog"}

    commits = hub.commits()
    assert len(commits) == 4
    for step, files in zip((2, 4, 6), commits[:3], strict=True):
        assert files == {f"checkpoints/{step}/pytorch_lora_weights.safetensors": f"weights {step}".encode()}
    final = commits[3]
    assert final["pytorch_lora_weights.safetensors"] == b"final weights"
    assert set(final) == {"pytorch_lora_weights.safetensors", "README.md", "validation/step_6/a_dog.png"}
    card = final["README.md"].decode()
    assert "](validation/step_6/a_dog.png)" in card and "load_lora_weights('tester/sks-dog')" in card

    # The token only ever travels in the Authorization header.
    assert all(c["headers"].get("authorization") == f"Bearer {FAKE_TOKEN}" for c in hub.calls)
    assert not any(FAKE_TOKEN.encode() in c["body"] for c in hub.calls)
    trainer.save_checkpoint(tmp_path / "state.ckpt")
    assert FAKE_TOKEN.encode() not in (tmp_path / "state.ckpt").read_bytes()
    assert FAKE_TOKEN not in json.dumps(cb.state_dict()) and FAKE_TOKEN not in repr(cb)
    assert all(FAKE_TOKEN.encode() not in data for data in _snapshot(out).values())
    assert FAKE_TOKEN not in logs.text()
    assert not [r for r in logs.records if r.levelno >= logging.ERROR]


def test_push_checkpoints_false_only_final(hub, tmp_path):
    out = tmp_path / "out"
    cb = HubUploadCallback(out, "me/no-ckpts", push_checkpoints=False, endpoint=hub.url, token=FAKE_TOKEN)
    _fit(out, cb, steps=4, every=2)
    assert len(hub.calls_to("create")) == 1
    commits = hub.commits()
    assert len(commits) == 1
    assert not any(path.startswith("checkpoints/") for path in commits[0])
    assert {"README.md", "pytorch_lora_weights.safetensors"} <= set(commits[0])
    assert cb.repo_id == "me/no-ckpts"


def test_failures_are_retried_then_logged(hub, logs, tmp_path):
    hub.fail_commits = True
    out = tmp_path / "out"
    cb = HubUploadCallback(out, "flaky", endpoint=hub.url, max_retries=2, backoff_s=0.01)
    trainer = _fit(out, cb, steps=4, every=2)

    assert trainer.state.finished and trainer.global_step == 4
    attempts = hub.calls_to("commit")
    assert len(attempts) == 3 * 3  # (checkpoints 2 and 4 + final) x (1 try + 2 retries)
    errors = [r.getMessage() for r in logs.records if r.levelno >= logging.ERROR and r.name == "callbacks.hub"]
    assert len(errors) == 3 and all("failed after 3 attempt(s)" in m for m in errors)
    assert FAKE_TOKEN not in logs.text()
    files = _snapshot(out)  # nothing was moved or deleted
    for step in (2, 4):
        assert files[f"checkpoints/{step}/checkpoint.ckpt"] == b"lightning state"
        assert files[f"checkpoints/{step}/pytorch_lora_weights.safetensors"] == f"weights {step}".encode()
    assert files["pytorch_lora_weights.safetensors"] == b"final weights" and "README.md" in files
    assert cb.wait(timeout=1)
