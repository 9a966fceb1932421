"""The DDPM training loss of SD 1.5, SD 2 (v-prediction) and SDXL on fixed batches and seeds.

``tests/data/ddpm_losses.json`` holds these values as computed by the code before the family platform
(flow matching, transformer denoisers) was introduced; test_ddpm_unchanged.py recomputes them with the
code of today. Regenerate only on purpose: ``python tests/ddpm_reference.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "ddpm_losses.json"

# (name, overrides): each a setting whose loss path must stay exactly as it was.
CASES = [
    ("sd15", ["model=sd15"]),
    ("sd15_objective_knobs", ["model=sd15", "model.min_snr_gamma=5", "model.noise_offset=0.1",
                              "model.input_perturbation=0.1", "data.caption_dropout_probability=0.5"]),
    ("sd15_timestep_range", ["model=sd15", "model.min_timestep=200", "model.max_timestep=800"]),
    ("sd15_zero_terminal_snr", ["model=sd15", "model.zero_terminal_snr=true", "model.prediction_type=v_prediction",
                                "model.min_snr_gamma=5"]),
    ("sd2_v_prediction", ["model=sd2", "model.min_snr_gamma=5"]),
    ("sdxl", ["model=sdxl", "model.noise_offset=0.05"]),
]
SEEDS = (0, 1, 2)


def losses(demo_dir: Path, overrides: list[str]) -> list[float]:
    """Loss of the first fixed batch under each seed (no dropout draws differ: same generator)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tuner.config import register
    from tuner.run import prepare

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"demo_assets_dir={demo_dir}", "output_dir=/tmp/unused", "max_train_steps=4", *overrides],
        )
    cfg = prepare(cfg)
    data = instantiate(cfg.data, seed=cfg.seed, cache_dir=None)
    batch = data.fixed_batches(1)[0]
    torch.manual_seed(0)  # LoRA's gaussian init: the adapter starts the same every time
    module = instantiate(
        cfg.model,
        optimizer=None,
        lr_scheduler=None,
        caption_dropout_probability=cfg.data.caption_dropout_probability,
        mixed_precision="no",
        seed=cfg.seed,
    )
    out = []
    with torch.no_grad():
        for seed in SEEDS:
            out.append(float(module.compute_loss(batch, torch.Generator().manual_seed(seed))))
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from datamodules.demo import write_images
    from tuner.config.families import write_tiny

    demo = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/tuner-ddpm-reference")
    for family in ("sd15", "sd2", "sdxl"):
        write_tiny(family, demo / family)
    write_images(demo / "images")
    values = {name: losses(demo, overrides) for name, overrides in CASES}
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps(values, indent=1) + "\n")
    print(json.dumps(values, indent=1))
