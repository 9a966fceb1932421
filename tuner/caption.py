"""`python -m tuner.caption DIR [--model ID] [--prefix WORD] [--overwrite] ...`: write a caption beside each image.

Each image under DIR (recursively; the extensions tuner reads) gets ``NAME.txt`` beside it, written by a
vision-language model through transformers' ``AutoModelForImageTextToText`` and the model's ``AutoProcessor``.
Images that already have a ``.txt`` are skipped unless ``--overwrite``, so an interrupted run resumes.
An unreadable image is skipped with a one-line reason and counted. A missing DIR, or a model that cannot
be loaded, exits 2 with one line.

The default model is Qwen/Qwen2.5-VL-3B-Instruct: it writes accurate, detailed captions, and in bfloat16
its weights take about 7.5 GB, so it runs on a 12 GB card. Others that work with the same classes:
HuggingFaceTB/SmolVLM-256M-Instruct (much smaller, plainer captions), Qwen/Qwen2.5-VL-7B-Instruct (24 GB),
florence-community/Florence-2-large (transformers' own Florence-2; it has no chat template, so its prompt
is a task token, ``<MORE_DETAILED_CAPTION>`` by default). microsoft/Florence-2-large runs its own code:
it needs ``--trust-remote-code``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
DEFAULT_PROMPT = (
    "Describe this image in one or two sentences for a text-to-image training caption: the subject, "
    "the setting, the style and the lighting. Do not start with 'The image shows'."
)
FLORENCE_PROMPT = "<MORE_DETAILED_CAPTION>"  # Florence-2 takes task tokens, not instructions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tuner.caption", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="folder of images (searched recursively)")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hub id or local folder of an image-text-to-text model (default {DEFAULT_MODEL}: detailed, "
        "accurate captions, about 7.5 GB in bfloat16, so it fits a 12 GB card)",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help="the instruction (default: a short captioning instruction; for Florence-2, <MORE_DETAILED_CAPTION>)",
    )
    parser.add_argument(
        "--prefix", default="", help="a trigger word put first: --prefix sks gives 'sks, a photo of ...'"
    )
    parser.add_argument("--overwrite", action="store_true", help="rewrite captions that already exist")
    parser.add_argument("--batch-size", type=int, default=4, help="images per generate call (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="caption length limit in tokens (default 128)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: cuda when there is one)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model's own code from its repository (needed by microsoft/Florence-2-*)",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--batch-size and --max-new-tokens must be at least 1")
    return args


def find_images(root: Path) -> list[Path]:
    """Every image under ``root`` whose extension tuner reads, in a stable order; hidden folders left out."""
    from datamodules.images import IMAGE_EXTENSIONS

    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def caption_path(image: Path) -> Path:
    return image.with_suffix(".txt")


def pick_device(name: str | None) -> str:
    import torch

    if name:
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def load_model(model_id: str, device: str, trust_remote_code: bool):
    """(model, processor, dtype) on ``device``: bfloat16 on a GPU that supports it, else float32."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.float32
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    elif device.startswith("cuda") or device == "mps":
        dtype = torch.float16
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), processor, dtype


def is_florence(model) -> bool:
    return "florence" in str(getattr(model.config, "model_type", "")).lower()


def build_prompt(processor, prompt: str) -> str:
    """The prompt through the processor's chat template (one user message: the image, then the text) where
    it has one, with the assistant's turn opened; else the plain prompt."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return prompt


def clean(text: str, prefix: str) -> str:
    """Whitespace collapsed, and the trigger word first (``sks, ...``)."""
    text = re.sub(r"\s+", " ", text).strip()
    if not prefix:
        return text
    return f"{prefix}, {text}" if text else prefix


def read_images(paths: list[Path], log) -> tuple[list[Path], list]:
    """The images of ``paths`` that decode (RGB, EXIF orientation applied), and their paths; each that does
    not is logged with its reason and left out."""
    from datamodules.images import load_rgb

    kept, images = [], []
    for path in paths:
        try:
            with path.open("rb") as fp:
                images.append(load_rgb(fp))
            kept.append(path)
        except Exception as err:  # any decoder's error: PIL raises several kinds for broken files
            reason = str(err).split(" <_io.")[0].strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log(f"skipped {path}: unreadable image ({reason})")
    return kept, images


def generate(model, processor, dtype, images: list, text: str, max_new_tokens: int) -> list[str]:
    """One caption per image, greedy, decoding only the new tokens (a decoder-only model's output starts
    with the prompt; an encoder-decoder's, such as Florence-2's, does not)."""
    import torch

    inputs = processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
    inputs = inputs.to(model.device, dtype=dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    if not model.config.is_encoder_decoder and "input_ids" in inputs:
        out = out[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(out, skip_special_tokens=True)


def caption_all(todo: list[Path], model, processor, dtype, args) -> tuple[int, int]:
    """Caption ``todo`` in batches under a progress bar; (written, unreadable)."""
    from tqdm import tqdm

    prompt = args.prompt if args.prompt is not None else FLORENCE_PROMPT if is_florence(model) else DEFAULT_PROMPT
    text = build_prompt(processor, prompt)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and not model.config.is_encoder_decoder:
        tokenizer.padding_side = "left"  # a batch's prompts end where generation starts
    written = unreadable = 0
    with tqdm(total=len(todo), unit="image", desc="caption") as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            paths, images = read_images(batch, tqdm.write)
            unreadable += len(batch) - len(paths)
            if images:
                for path, caption in zip(
                    paths, generate(model, processor, dtype, images, text, args.max_new_tokens), strict=True
                ):
                    caption_path(path).write_text(clean(caption, args.prefix) + "\n", encoding="utf-8")
                    written += 1
            bar.update(len(batch))
    return written, unreadable


def main(argv: list[str] | None = None) -> int:
    from tuner.runtime.console import quiet_third_parties

    args = parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        print(f"tuner.caption: error: no such folder: {root}", file=sys.stderr)
        return 2
    images = find_images(root)
    todo = images if args.overwrite else [p for p in images if not caption_path(p).exists()]
    print(f"tuner.caption: {len(images)} images, {len(images) - len(todo)} already captioned, {len(todo)} to caption")
    if not todo:
        return 0
    quiet_third_parties()
    device = pick_device(args.device)
    try:
        model, processor, dtype = load_model(args.model, device, args.trust_remote_code)
    except Exception as err:  # missing repo, no network, unsupported architecture, remote code refused, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"tuner.caption: error: cannot load model {args.model}: {reason}", file=sys.stderr)
        return 2
    written, unreadable = caption_all(todo, model, processor, dtype, args)
    print(f"tuner.caption: wrote {written} captions, skipped {unreadable} unreadable image(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
