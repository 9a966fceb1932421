"""``model.compile=true``: the denoiser is compiled in place (``nn.Module.compile``), so training runs its graphs
while its weights, their names, the checkpoints and the export stay as they were. The tests compile through a
backend that records each graph dynamo hands it and runs it eagerly (inductor's C++ build takes tens of seconds a
graph on this CPU; ``bench/compile.py`` measures the real one)."""

import torch
from safetensors.torch import load_file

from tuner.run import build_datamodule, build_module, prepare, train

GRAPHS: list[int] = []  # ops in each graph the counting backend was handed


def _counting_backend(gm, example_inputs):
    GRAPHS.append(len(gm.graph.nodes))
    return gm.forward


torch._dynamo.register_backend(name="tuner_counting", compiler_fn=_counting_backend)


def _loss(module, batch) -> torch.Tensor:
    return module.compute_loss(batch, torch.Generator().manual_seed(0))


def test_the_compiled_denoiser_runs_dynamos_graphs_and_gives_the_eager_loss(make_cfg, tmp_path):
    cfg = prepare(make_cfg("model.compile=true", "model.compile_backend=tuner_counting", output_dir=tmp_path))
    compiled = build_module(cfg, with_optimizer=False)
    eager = build_module(prepare(make_cfg(output_dir=tmp_path / "eager")), with_optimizer=False)
    (batch,) = build_datamodule(cfg, tmp_path).fixed_batches(1)
    assert compiled.denoiser._compiled_call_impl is not None and eager.denoiser._compiled_call_impl is None
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # compiled in place: no _orig_mod. names
    GRAPHS.clear()
    torch._dynamo.reset()
    loss = _loss(compiled, batch)
    assert GRAPHS and sum(GRAPHS) > 50  # the UNet's forward went through dynamo (LoRA layers included)
    torch.testing.assert_close(loss, _loss(eager, batch), rtol=0, atol=0)
    loss.backward()
    assert all(p.grad is not None for p in compiled.parameters() if p.requires_grad)


def test_a_compiled_run_exports_the_same_layers(make_cfg, tmp_path):
    common = ("max_train_steps=2", "callbacks.validation.enabled=false")
    train(make_cfg(*common, "model.compile=true", "model.compile_backend=tuner_counting", output_dir=tmp_path / "c"))
    train(make_cfg(*common, output_dir=tmp_path / "e"))
    a, b = (load_file(tmp_path / run / "pytorch_lora_weights.safetensors") for run in ("c", "e"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same steps, through dynamo's graphs run eagerly
