"""`python -m tuner.sample`: a finished run's LoRA on its base, a full fine-tune's pipeline/ and a pipeline folder,
sampled as the run's validation samples (issue 23)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_cfg
from PIL import Image

from tuner.run import train

PROMPT = "a red circle"
QUICK = ("max_train_steps=2", "data.resolution=64", "callbacks.validation.resolution=64",
         "callbacks.validation.num_inference_steps=2")


@pytest.fixture(scope="module")
def lora_run(demo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample_lora")
    train(tiny_cfg(demo_dir, out, *QUICK, "optimizer.lr=5e-2"))
    return out


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def sample_cli(source: Path, out: Path, *extra: str) -> list[Path]:
    result = run_cli("-m", "tuner.sample", str(source), PROMPT, "--steps", "2", "-o", str(out), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return [Path(line) for line in result.stdout.split()]


def by_hand(demo_dir: Path, run: Path, seed: int) -> np.ndarray:
    """The run's LoRA loaded into its base pipeline by hand, sampled with the run's validation settings."""
    from diffusers import DiffusionPipeline

    from tuner.export import trained_scheduler

    pipe = DiffusionPipeline.from_pretrained(demo_dir / "sd15", safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(run)
    pipe.scheduler = trained_scheduler(run, pipe.scheduler)
    image = pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, height=64, width=64, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(42)).images[0]
    return np.round(image * 255).astype(np.int16)


def test_lora_run_samples_count_images_as_loaded_by_hand(lora_run, demo_dir, tmp_path):
    paths = sample_cli(lora_run, tmp_path, "--count", "2")
    assert [p.name for p in paths] == ["42_a_red_circle.png", "43_a_red_circle.png"]
    assert all(Image.open(p).size == (64, 64) for p in paths)
    assert np.abs(pixels(paths[0]) - by_hand(demo_dir, lora_run, 42)).max() <= 1
    assert not np.array_equal(pixels(paths[0]), pixels(paths[1]))  # seeds 42 and 43


def test_lora_changes_the_image_against_its_base(lora_run, demo_dir, tmp_path):
    (tuned,) = sample_cli(lora_run, tmp_path / "tuned")
    (base,) = sample_cli(demo_dir / "sd15", tmp_path / "base", "--size", "64x64", "--guidance", "7.5", "--seed", "42")
    assert np.abs(pixels(tuned) - pixels(base)).mean() > 0.5


def test_full_run_samples_from_its_pipeline(demo_dir, tmp_path):
    run = tmp_path / "full"
    train(tiny_cfg(demo_dir, run, *QUICK, "max_train_steps=1", "model.finetune=full", "callbacks.validation.enabled=false"))
    (path,) = sample_cli(run, tmp_path / "out")
    assert path.parent == tmp_path / "out" and Image.open(path).size == (64, 64)


def test_pipeline_folder_samples_with_family_defaults(demo_dir, tmp_path):
    (path,) = sample_cli(demo_dir / "sd15", tmp_path, "--size", "64x48", "--seed", "7")
    assert path.name == "7_a_red_circle.png" and Image.open(path).size == (64, 48)


@pytest.mark.parametrize("what", ["missing", "edit"])
def test_user_errors_exit_2_with_one_line(what, demo_dir, tmp_path):
    source = tmp_path / "nowhere" if what == "missing" else demo_dir / "qwen_image_edit"
    result = run_cli("-m", "tuner.sample", str(source), PROMPT, "-o", str(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuner: error:")
    assert ("no such folder" in lines[0]) if what == "missing" else ("--image" in lines[0])
