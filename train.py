"""tuner's entry point: `python train.py [overrides]`. See README.md and conf/train.yaml."""

from tuner.runtime.startup import collector_off, skip_mode_probe

collector_off()  # until the libraries have imported (tuner/runtime/startup.py): over a second of start-up

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tuner.config import register, unknown_key_hint  # noqa: E402

register()
CONF = str(Path(__file__).resolve().parent / "conf")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from tuner.runtime.console import keep_unused_packages_out, quiet_third_parties

    keep_unused_packages_out(cfg)  # bitsandbytes only when the run uses it
    quiet_third_parties()  # before the libraries load: their known noise stays out of the console
    from tuner.run import report_user_error, train, user_error

    try:
        return train(cfg)
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        report_user_error(found)  # one line (on the console and in train.log): what is wrong and what to do
        sys.exit(2)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):  # single runs only; a sweep reports through Hydra
        hint = unknown_key_hint(args, CONF)
        if hint:
            print(f"tuner: error: {hint}", file=sys.stderr)
            sys.exit(2)
    skip_mode_probe(CONF, args)  # Hydra's second compose, only to read hydra.mode, when nothing can set it
    main()
