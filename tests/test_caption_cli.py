"""`python -m tuner.caption` with the tiny random captioner (`python -m tuner.tiny captioner DIR`): the
mechanics only (which files get a caption, the prefix, resuming, --overwrite, unreadable images, exit codes),
since a random model's words are gibberish."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

CAPTION_ARGS = ("--prefix", "sks", "--max-new-tokens", "8", "--batch-size", "2", "--device", "cpu")
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("captioner") / "model"
    result = run_cli("-m", "tuner.tiny", "captioner", str(path), env=ENV)
    assert result.returncode == 0, result.stderr
    assert (path / "config.json").exists() and (path / "processor_config.json").exists()
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    """a.png, sub/b.png (uncaptioned), c.png (captioned already), broken.png (not an image)."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (24, 48), (30, 200, 30)).save(root / "sub" / "b.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(root / "c.png")
    (root / "c.txt").write_text("a blue square\n")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def caption(root: Path, model: Path, *extra: str):
    return run_cli("-m", "tuner.caption", str(root), "--model", str(model), *CAPTION_ARGS, *extra, env=ENV)


def test_captions_each_readable_image_with_the_prefix(captioner, images):
    result = caption(images, captioner)
    assert result.returncode == 0, result.stderr
    for image in (images / "a.png", images / "sub" / "b.png"):
        text = image.with_suffix(".txt").read_text(encoding="utf-8")
        assert text.startswith("sks, ") or text == "sks\n", text
        assert text.endswith("\n") and "\n" not in text.rstrip("\n")
    assert (images / "c.txt").read_text() == "a blue square\n"  # resumed: left as it was
    assert not (images / "broken.txt").exists()
    assert f"skipped {images / 'broken.png'}: unreadable image" in result.stdout
    assert "wrote 2 captions, skipped 1 unreadable image(s)" in result.stdout


def test_overwrite_rewrites_existing_captions(captioner, images):
    result = caption(images, captioner, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (images / "c.txt").read_text(encoding="utf-8").startswith("sks")
    assert "wrote 3 captions, skipped 1 unreadable image(s)" in result.stdout


def test_nothing_to_do_loads_no_model(images, tmp_path):
    for name in ("a", "sub/b", "broken"):
        (images / f"{name}.txt").write_text("done\n")
    result = caption(images, tmp_path / "no-model-here")
    assert result.returncode == 0, result.stderr
    assert "0 to caption" in result.stdout


def test_missing_dir_exits_2_with_one_line(tmp_path):
    result = caption(tmp_path / "missing", tmp_path / "model")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such folder" in result.stderr


def test_unloadable_model_exits_2_with_one_line(images, tmp_path):
    result = caption(images, tmp_path / "no-model-here")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "cannot load model" in result.stderr
    assert not (images / "a.txt").exists()
