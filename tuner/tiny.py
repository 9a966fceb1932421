"""`python -m tuner.tiny FAMILY DIR [--learnable]`: write a tiny random pipeline in the real on-disk layout.

`python -m tuner.tiny images DIR` writes the demo's small generated image set instead, and
`python -m tuner.tiny captioner DIR` a tiny random image-to-text model (for `python -m tuner.caption`'s tests).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from tuner.runtime.console import quiet_third_parties

    quiet_third_parties()  # before the families' libraries load
    from tuner.config.families import tiny_names

    parser = argparse.ArgumentParser(prog="python -m tuner.tiny", description=__doc__.splitlines()[0])
    parser.add_argument(
        "family",
        choices=[*tiny_names(), "images", "captioner"],
        help="model family (or a variant of one), 'images' or 'captioner'",
    )
    parser.add_argument("dir", help="output directory (left as it is if it already holds one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--learnable",
        action="store_true",
        help="fit the tiny VAE into a nearly deterministic autoencoder with unit-variance latents, so that the "
        "pipeline can be shown to learn (bench/learn.py); pixel-space families are unchanged",
    )
    args = parser.parse_args(argv)
    if args.family == "captioner":  # not a diffusion family: a tiny VLM for tuner.caption
        from models.tiny_captioner import write_captioner

        path = write_captioner(args.dir, seed=args.seed)
    elif args.family == "images":
        from datamodules.demo import write_images

        path = write_images(args.dir, seed=args.seed)
    else:
        from tuner.config.families import write_tiny

        path = write_tiny(args.family, args.dir, seed=args.seed, learnable=args.learnable)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
