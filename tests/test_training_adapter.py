"""Z-Image-Turbo's training adapter, fetched as ai-toolkit names it (``owner/repo/file.safetensors``) from a Hub
served on 127.0.0.1 (real sockets, real ``hf_hub_download``): the named file of a repo that holds two, active while
the tiny Turbo transformer trains, off while validation samples, and in neither the exported LoRA nor its card's
weights. (FLUX.1 [schnell]'s adapter, the same hooks, is tested in tests/test_flux_schnell.py.)"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import point_hub_at
from huggingface_hub import constants as hf_constants
from safetensors.torch import load_file

from tuner.run import build_module, prepare, train

REPO = "ostris/zimage_turbo_training_adapter"
FILES = ("zimage_turbo_training_adapter_v1.safetensors", "zimage_turbo_training_adapter_v2.safetensors")


class FileHub:
    """Just enough of the Hub to download files: HEAD and GET of ``/<repo>/resolve/<revision>/<file>``."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = req.path.split("?", 1)[0].strip("/")
        self.requests.append((req.command, path))
        repo, _, rest = path.partition("/resolve/")
        name = rest.split("/", 1)[-1]
        data = self.files.get(f"{repo}/{name}")
        if data is None:
            req.send_response(404)
            req.send_header("X-Error-Code", "EntryNotFound")
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        req.send_response(200)
        req.send_header("X-Repo-Commit", "1" * 40)
        req.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _adapter(pipe_dir, out, seed: int) -> bytes:
    """A training adapter for the tiny Z-Image (rank 2 on to_q/to_k, nonzero weights), as ZImagePipeline saves one."""
    from diffusers import ZImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = ZImagePipeline.from_pretrained(pipe_dir).transformer
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k"]), adapter_name="adapter")
    torch.manual_seed(seed)
    for name, p in transformer.named_parameters():
        if ".adapter." in name:
            p.data.normal_(0.0, 0.3)  # lora_B starts at zero: give it weights that change the output
    ZImagePipeline.save_lora_weights(
        out, transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="adapter"),
        weight_name="adapter.safetensors",
    )  # fmt: skip
    return (out / "adapter.safetensors").read_bytes()


@pytest.fixture
def hub(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    files = {f"{REPO}/{name}": _adapter(demo_dir / "z_image", tmp_path / name, seed) for seed, name in enumerate(FILES)}
    server = FileHub(files)
    point_hub_at(monkeypatch, server.url)
    yield server
    server.close()


def test_turbo_trains_with_the_named_adapter_file_and_samples_without_it(make_cfg, hub, tmp_path):
    spec = f"model.options.training_adapter={REPO}/{FILES[1]}"
    out = tmp_path / "run"
    overrides = ("model=z_image", spec, "max_train_steps=2", "callbacks.ema.enabled=false")
    module = build_module(prepare(make_cfg(*overrides, output_dir=tmp_path / "m")), with_optimizer=False)
    # the v2 file, downloaded, not the repo's other file
    assert module.training_adapter_file.read_bytes() == hub.files[f"{REPO}/{FILES[1]}"]
    assert not any(FILES[0] in path for _, path in hub.requests)
    x, t, cond = torch.randn(1, 16, 8, 8), torch.tensor([500.0]), module.encode_prompts(["a red circle"])
    with torch.no_grad():
        trained = module.denoise(x, t, cond, {})
        with module.sampling_context():  # what validation samples with
            sampled = module.denoise(x, t, cond, {})
    assert (trained - sampled).abs().max() > 1e-4  # training sees the adapter, sampling does not

    train(make_cfg(*overrides, output_dir=out))
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and not any("training_adapter" in k for k in lora)
    adapter = load_file(tmp_path / FILES[1] / "adapter.safetensors")
    assert not any(torch.equal(v, a.to(v.dtype)) for v in lora.values() for a in adapter.values() if a.shape == v.shape)
    card = (out / "README.md").read_text()
    assert f"{REPO}/{FILES[1]}" in card and "plain Z-Image-Turbo" in card


def test_a_hub_file_that_is_not_there_fails_with_the_key_and_the_hubs_answer(make_cfg, hub, tmp_path):
    spec = f"model.options.training_adapter={REPO}/missing.safetensors"
    with pytest.raises(
        Exception,
        match=f"training_adapter={REPO}/missing.safetensors: not a local path, and the Hub would not give it \\(404",
    ):
        build_module(prepare(make_cfg("model=z_image", spec, output_dir=tmp_path)), with_optimizer=False)
    assert ("HEAD", f"{REPO}/resolve/main/missing.safetensors") in hub.requests
