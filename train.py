"""tuner's entry point: `python train.py [overrides]`. See README.md and conf/train.yaml."""

import hydra
from omegaconf import DictConfig

from tuner.config import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from tuner.run import train

    return train(cfg)


if __name__ == "__main__":
    main()
