"""`python -m tuner.import simpletuner CONFIG.json [--backend multidatabackend.json] -o conf/experiment/NAME.yaml`:
a SimpleTuner config as a tuner experiment, run with `python train.py +experiment=NAME`.

Every key it cannot carry over is listed with the reason, on stderr and at the top of the YAML; secrets are
left out, and it says where they go instead. The written experiment then goes through tuner's own config
checks (no weights load). The mapping itself is tuner/interop/simpletuner.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

CONF = Path(__file__).resolve().parents[1] / "conf"
ORDER = ("model", "data", "optimizer", "lr_scheduler", "quantization", "callbacks", "logger")  # run keys first


def report(result) -> list[str]:
    """What did not carry over, the secrets left out, and what to check: one line each."""
    lines = [f"Not imported ({len(result.unmapped)}):"] + [f"  {key}: {why}" for key, why in result.unmapped]
    if result.secrets:
        lines += ["Secrets left out of this file:"] + [f"  {key}: {where}" for key, where in result.secrets]
    if result.notes:
        lines += ["Check these:"] + [f"  {note}" for note in result.notes]
    return [line.replace("\n", " ") for line in lines]


def render(result) -> str:
    """The experiment YAML: the report as comments, then the group choices and the values."""
    head = [
        "@package _global_",
        f"Imported from SimpleTuner ({', '.join(result.sources)}) by `python -m tuner.import simpletuner`.",
        f"Keys the SimpleTuner config does not set keep the {result.defaults['preset']} preset's values.",
        "",
        *report(result),
    ]
    body = {"defaults": [{f"override /{group}": option} for group, option in result.defaults.items()]}
    body.update(sorted(result.values.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else -1))
    text = yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=120)
    return "".join(f"# {line}".rstrip() + "\n" for line in head) + text


def check(path: Path, overrides: list[str] | tuple = ()) -> str | None:
    """Compose the experiment at ``path`` with the real config (``+experiment=...``) and run tuner's checks,
    which load no weights: the problem in one line, or None."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tuner.config import ConfigError, register
    from tuner.run import prepare

    register()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "experiment").mkdir()
        shutil.copy(path, Path(tmp) / "experiment" / "tuner_import_check.yaml")  # a name no real one shadows
        search = ["+experiment=tuner_import_check", f"hydra.searchpath=[file://{tmp}]", *overrides]
        try:
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                prepare(compose("train", overrides=search))
        except (ConfigError, HydraException, OmegaConfBaseException) as err:
            return str(err.__cause__ or err).splitlines()[0]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuner.import", description=__doc__.splitlines()[1])
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    simpletuner = sources.add_parser("simpletuner", help="a SimpleTuner config.json (+ multidatabackend.json)")
    simpletuner.add_argument("config", help="SimpleTuner's config.json (keys with or without their leading --)")
    simpletuner.add_argument("--backend", help="its multidatabackend.json (default: the config's data_backend_config)")
    simpletuner.add_argument("-o", "--output", required=True, help="the experiment to write: conf/experiment/NAME.yaml")
    simpletuner.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.force:
        print(f"tuner: error: {output} exists; add --force to overwrite it", file=sys.stderr)
        return 2
    from tuner.interop.simpletuner import SimpleTunerError, convert

    try:
        result = convert(args.config, args.backend)
    except SimpleTunerError as err:
        print(f"tuner: error: {err}", file=sys.stderr)
        return 2
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(result), encoding="utf-8")
    print("\n".join(report(result)), file=sys.stderr)
    problem = check(output)
    if problem:  # the experiment would fail in train.py: say why, and exit non-zero
        print(f"tuner: error: tuner's config check fails on the written {output}: {problem}", file=sys.stderr)
        return 2
    print("tuner's config check: passed", file=sys.stderr)
    print(f"wrote {output}")
    where = "" if output.resolve().parent == CONF / "experiment" else "copy it to conf/experiment/, then "
    print(f"run it: {where}python train.py +experiment={output.stem}")
    return 0


if __name__ == "__main__":
    from tuner.runtime.console import quiet_third_parties

    quiet_third_parties()  # before the family classes load diffusers and transformers
    sys.exit(main())
