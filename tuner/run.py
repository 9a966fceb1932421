"""Assemble a run from the composed config and train it.

The order matters: validate the config and scan the data (cheap, and where most mistakes show),
then load weights, then fit. Every object comes from its config group through Hydra's instantiate.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from tuner.config import ConfigError, check
from tuner.runtime.cluster import is_submitit_launcher, launcher_tasks
from tuner.runtime.console import phase
from tuner.runtime.model import build_module, check_model_path, import_family

log = logging.getLogger("tuner")

PRECISION = {"no": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}


def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _is_distributed(cfg: DictConfig) -> bool:
    devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
    many = isinstance(devices, int) and devices > 1 or str(devices) == "-1" or isinstance(devices, (list, tuple))
    strategy = (
        str(cfg.trainer.strategy.get("_target_", ""))
        if isinstance(cfg.trainer.strategy, DictConfig)
        else str(cfg.trainer.strategy)
    )
    return many or nodes > 1 or "ddp" in strategy.lower() or "fsdp" in strategy.lower()


def job_output_dir(cfg: DictConfig) -> str:
    """``output_dir`` for a single run; ``<output_dir>/<job number>`` for a job of a sweep."""
    if _is_multirun():
        return HydraConfig.get().runtime.output_dir
    return str(cfg.output_dir)


def setup_logging(output_dir: Path, rank_zero: bool) -> None:
    """Console at TUNER_LOG_LEVEL (default WARNING, the seed's SIMPLETUNER_LOG_LEVEL); ``train.log`` at
    INFO always, and ``debug.log`` too at DEBUG."""
    import lightning  # noqa: F401  (it installs console handlers on import; they are replaced below)

    from tuner.runtime.console import PHASE, ConsoleFormatter, ConsoleLevel

    level = os.environ.get("TUNER_LOG_LEVEL", "WARNING").upper()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if level == "DEBUG" else logging.INFO)
    console = logging.StreamHandler()
    console.setLevel(min(logging.getLevelName(level), logging.INFO))  # phase lines are INFO
    console.addFilter(ConsoleLevel(logging.getLevelName(level)))
    PHASE.disabled = not rank_zero  # one process reports the phases
    handlers: list[logging.Handler] = [console]
    if rank_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        train_log = _FileHandler(output_dir / "train.log")
        train_log.setLevel(logging.INFO)
        handlers.append(train_log)
        if level == "DEBUG":
            handlers.append(_FileHandler(output_dir / "debug.log"))
    for handler in list(root.handlers):  # Hydra's console handler would print every line twice
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(ConsoleFormatter() if handler is console else fmt)
        handler.addFilter(_drop_adverts)
        root.addHandler(handler)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        # Lightning installs its own console handler when it is imported first; route through ours.
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


class _FileHandler(logging.FileHandler):
    """A log file whose write failures (a full disk) are not printed as tracebacks on the console: the
    run reports what went wrong itself, in one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _drop_adverts(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def _is_rank_zero() -> bool:
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(int(os.environ.get(var, "0")) == 0 for var in ranks)


def prepare(cfg: DictConfig, require_steps: bool = True) -> DictConfig:
    """Validate and settle the config; nothing heavy is imported or loaded here."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required config values: {', '.join(missing)}")
    check(cfg, require_steps=require_steps)
    if _is_multirun() and _is_distributed(cfg) and not is_submitit_launcher():
        # Lightning starts DDP workers by re-running this command line, sweep flags and all, so each
        # worker would start the whole sweep again.
        raise ConfigError(
            "a multirun sweep (-m) cannot use a multi-process trainer with Hydra's basic launcher; run each job on "
            "its own, or submit the sweep to SLURM with hydra/launcher=slurm trainer=slurm (each job its own tasks)"
        )
    tasks = launcher_tasks()
    if tasks > 1 and not _is_distributed(cfg):
        # every task would train the whole run on its own, into the same output_dir
        raise ConfigError(
            f"hydra/launcher=slurm starts {tasks} tasks per job but trainer={HydraConfig.get().runtime.choices.get('trainer')} "
            "runs one process: add trainer=slurm (one DDP rank per task), or ask for one task "
            "(hydra.launcher.gpus_per_node=1 hydra.launcher.nodes=1)"
        )
    with open_dict(cfg):
        cfg.output_dir = str(Path(job_output_dir(cfg)).absolute())
    if str(cfg.optimizer._target_).endswith("Prodigy") and cfg.optimizer.lr != 1.0:
        log.warning(
            "optimizer=prodigy with optimizer.lr=%s: Prodigy finds the step size itself and expects lr=1.0 "
            "(a preset's AdamW lr may have carried over; set optimizer.lr=1.0)",
            cfg.optimizer.lr,
        )
    # From here on a plain, fully resolved config: enums become their names, interpolations values.
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    from tuner.config.families import check_family

    check_family(plain)
    from tuner.runtime.scale import check_sharding

    check_sharding(plain)  # FSDP / DeepSpeed: what they cannot do, refused before load
    return plain


def build_trainer(cfg: DictConfig, output_dir: Path, datamodule=None, module=None):
    from callbacks.checkpoints import StepCheckpoint

    steps = cfg.max_train_steps if cfg.max_train_steps and cfg.max_train_steps > 0 else -1
    epochs = cfg.num_train_epochs if steps < 0 else -1
    from tuner.runtime.lifecycle import lifecycle_callbacks

    callbacks = lifecycle_callbacks(cfg, output_dir, datamodule)
    if cfg.logger:
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks.append(LearningRateMonitor(logging_interval="step"))  # "lr" in the loggers, every step
    if cfg.trainer.enable_progress_bar:
        callbacks.append(progress_callback(cfg.callbacks.progress))
    callbacks.append(StepCheckpoint(output_dir / "checkpoints", cfg.checkpointing_steps, cfg.checkpoints_total_limit))
    trainer_cfg = cfg.trainer
    if cfg.model.experts and str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")).endswith("DDPStrategy"):
        # a two-expert step leaves the other expert's adapter unused (on every rank alike): DDP must expect that
        trainer_cfg = OmegaConf.merge(cfg.trainer, {"strategy": {"find_unused_parameters": True}})
    extra = {}
    if module is not None:
        from tuner.runtime.scale import fsdp_strategy, is_fsdp

        if is_fsdp(cfg):  # sharding follows the family's declared blocks
            extra["strategy"] = fsdp_strategy(cfg, module)
    return instantiate(
        trainer_cfg,
        **extra,
        max_steps=steps,
        max_epochs=epochs,
        precision=PRECISION[cfg.mixed_precision],
        accumulate_grad_batches=cfg.gradient_accumulation_steps,
        gradient_clip_val=cfg.max_grad_norm or None,
        callbacks=callbacks,
        logger=instantiate(cfg.logger) if cfg.logger else False,
        default_root_dir=str(output_dir),
        enable_checkpointing=True,  # StepCheckpoint is the checkpoint callback; Lightning adds no other
        use_distributed_sampler=False,  # the bucket sampler splits batches across ranks itself
    )


def progress_callback(progress: DictConfig):
    """The step bar on a terminal; plain lines at a steady rate when stdout is a file (SLURM, nohup), where
    the bar's carriage-return refreshes would fill it. ``callbacks.progress.plain`` forces either."""
    plain = progress.plain if progress.plain is not None else not sys.stdout.isatty()
    if plain:
        from callbacks.progress_lines import StepProgressLines

        return StepProgressLines(every_s=progress.every_s, every_percent=progress.every_percent)
    from callbacks.progress import StepProgressBar

    return StepProgressBar()


def check_precision_for_device(cfg: DictConfig) -> None:
    """What the device cannot do, refused before any weight loads: fp16 autocast on CPU (Lightning would
    silently switch to bf16 over fp16 weights), fp8 on Apple GPUs, bitsandbytes 4-bit without CUDA."""
    import torch

    accelerator = str(cfg.trainer.accelerator)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if cfg.mixed_precision == "fp16" and on_cpu:
        raise ConfigError("mixed_precision=fp16 needs a GPU; on CPU use mixed_precision=bf16 or no")
    from models.quantize import device_problem

    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    quant = cfg.quantization
    levels = {"base_model_precision": quant.base_model_precision, "text_encoder_precision": quant.text_encoder_precision}
    levels.update({f"text_encoders.{k}": v for k, v in quant.text_encoders.items()})
    for key, level in levels.items():
        problem = device_problem(level, accelerator, torch.cuda.is_available(), mps)
        if problem:
            raise ConfigError(f"quantization.{key}: {problem}")


def ensure_demo_assets(cfg: DictConfig, pipeline: bool = True) -> None:
    """Write the tiny demo pipeline (unless ``pipeline`` is off: the dataset doctor) and images under
    ``demo_assets_dir`` if they are not there yet."""
    from datamodules.demo import write_clips, write_images, write_references
    from tuner.config.families import write_tiny
    from tuner.config.paired import DEMO_CLIPS, DEMO_REFERENCES

    root = Path(cfg.demo_assets_dir)
    # only what this run uses (a run of the tiny preset on its own model or data writes neither)
    if pipeline and Path(cfg.model.pretrained_model_name_or_path) == root / cfg.model.family:
        write_tiny(cfg.model.family, root / cfg.model.family)
    if cfg.data.path and Path(cfg.data.path) == root / DEMO_CLIPS:  # a video family's demo
        write_clips(root / DEMO_CLIPS)
    if cfg.data.path and Path(cfg.data.path) == root / "images":
        write_images(root / "images")
        if str(root / DEMO_REFERENCES) in (cfg.data.conditioning.reference.path, cfg.data.conditioning.control.path):
            write_references(root / "images", root / DEMO_REFERENCES)


def user_error(err: BaseException) -> BaseException | None:
    """The user-facing error behind ``err`` (Lightning and torch may wrap it), or None. Their messages
    are one line that names the key or file and says what to do; train.py prints just that line."""
    from callbacks.checkpoints import CheckpointError
    from datamodules import EmptyDatasetError
    from models.guard import NonFiniteError
    from tuner.runtime.lock import OutputDirLocked

    kinds = (ConfigError, EmptyDatasetError, CheckpointError, OutputDirLocked, NonFiniteError)
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kinds):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def report_user_error(err: BaseException) -> None:
    """``tuner: error: ...`` on stderr, on a line of its own, and in the run's ``train.log`` when it has one
    (the console handler is left out: the line is printed once)."""
    line = f"tuner: error: {err}"
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _FileHandler):
            handler.emit(logging.LogRecord("tuner", logging.ERROR, __file__, 0, line, None, None))
    print(line, file=sys.stderr, flush=True)


def write_config_dump(cfg: DictConfig, output_dir: Path) -> None:
    """``<output_dir>/.hydra/``: the composed config (unresolved, as Hydra writes it), the command-line
    overrides and Hydra's own settings. Written by the run itself once it holds the output directory and
    its data passed the preflight (Hydra's own early write is off), so a refused or failed start leaves
    an earlier run's record as it was."""
    folder = output_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), folder / "overrides.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")


def train(cfg: DictConfig) -> float | None:
    """Train as configured. Returns the sweep metric: the last ``val/loss`` when validation runs, else
    the final epoch-mean train loss (None when stopped by SIGTERM / Ctrl-C).

    Rank 0 holds ``<output_dir>/.tuner.lock`` from before it writes anything until it returns, so a
    second run into the same folder is refused at once (tuner.runtime.lock)."""
    from contextlib import nullcontext

    from tuner.runtime.lock import RunLock

    composed = cfg.copy()
    cfg = prepare(cfg)
    output_dir = Path(cfg.output_dir)
    lock = RunLock(output_dir) if _is_rank_zero() else None
    with lock or nullcontext():
        return _train(cfg, composed, output_dir, lock)


def _train(cfg: DictConfig, composed: DictConfig, output_dir: Path, lock) -> float | None:
    rank_zero = _is_rank_zero()
    setup_logging(output_dir, rank_zero)
    if lock is not None and lock.stale:
        log.warning("took over the output_dir lock of a run that ended without releasing it (%s)", lock.stale)

    import lightning as L

    check_precision_for_device(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.demo_assets_dir:
        ensure_demo_assets(cfg)
    check_model_path(cfg.model.pretrained_model_name_or_path)

    datamodule = build_datamodule(cfg, output_dir)
    with phase("scan") as report:
        datamodule.scan()  # an unusable dataset fails here, before any weights load
        report["what"] = datamodule.summary()
    ckpt_path = resume_checkpoint(cfg, output_dir)
    import_family(cfg)
    with phase("load") as report:
        module = build_module(cfg)
        report["what"] = module.summary()
    # a single-file base: what follows reads the diffusers folder written from it (the dump keeps the file)
    cfg.model.pretrained_model_name_or_path = module.hparams.pretrained_model_name_or_path
    if rank_zero:  # only once the run has started for real: a refused or failed start leaves the old record
        write_config_dump(composed, output_dir)
    from tuner.runtime.lifecycle import configure_export

    configure_export(module, cfg, datamodule, output_dir)
    datamodule.attach_encoders(**module.data_encoders())
    trainer = build_trainer(cfg, output_dir, datamodule, module)
    started = time.monotonic()
    if not fit(trainer, module, datamodule, ckpt_path, output_dir):
        return None
    return finish(trainer, module, output_dir, started)


def build_datamodule(cfg: DictConfig, output_dir: Path):
    from hydra.utils import get_class

    needs = get_class(cfg.model._target_).data_requirements()  # a class attribute: nothing loads
    if cfg.data.cache_text_embeds and needs.get("cache_text_embeds") is False:
        log.info("text-embedding cache off: %s encodes each prompt with its input image", cfg.model.family)
    elif cfg.data.cache_text_embeds and cfg.model.lora.get("text_encoders"):
        log.info("text-embedding cache off: model.lora.text_encoders trains %s, so each prompt is encoded in its step",
                 ", ".join(cfg.model.lora.text_encoders))
        needs["cache_text_embeds"] = False
    needs["cache_text_embeds"] = cfg.data.cache_text_embeds and needs.get("cache_text_embeds", True)
    return instantiate(
        cfg.data,
        **needs,
        seed=cfg.seed,
        report_path=str(output_dir / "dataset_report.json"),
        cache_dir=cfg.data.cache_dir or str(output_dir / "cache"),
    )


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint to resume from, checked (readable, and trained with this run's model setup) before
    any weight loads."""
    from hydra.utils import get_class

    from callbacks.checkpoints import check_resumable, resolve_checkpoint
    from tuner.runtime.cluster import auto_resume

    spec = auto_resume(cfg.resume_from_checkpoint)  # a cluster job carries on where it stopped
    ckpt_path = resolve_checkpoint(spec, output_dir / "checkpoints")
    if spec == "latest" and ckpt_path is None and cfg.resume_from_checkpoint == "latest":
        log.warning("resume_from_checkpoint=latest: no checkpoint in %s yet; starting from scratch", output_dir)
    if ckpt_path is not None:
        from tuner.interop.base_file import identity as base_identity

        model = cfg.model
        identity = get_class(model._target_).identity(
            model.family,
            base_identity(model),  # a single-file base: its hash
            model.finetune,
            model.lora,
            model.experts or model.expert,
            OmegaConf.to_container(model.lycoris),
        )
        check_resumable(ckpt_path, identity)
        log.info("resuming from %s", ckpt_path)
    return ckpt_path


def fit(trainer, module, datamodule, ckpt_path: str | None, output_dir: Path) -> bool:
    """``trainer.fit``; False when SIGTERM or Ctrl-C stopped it (its checkpoint is written)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from callbacks.checkpoints import StepCheckpoint

    with warnings.catch_warnings():
        # The data module restores the sampler's position itself (DiffusionDataModule.state_dict).
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        # The frozen VAE and text encoders are kept in eval mode on purpose (DiffusionModule.train).
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            # SIGTERM, Ctrl-C or a cluster's preemption warning: the step finished and its checkpoint is
            # written; a clean exit, or a requeue of the cluster job (tuner/runtime/cluster.py).
            if trainer.is_global_zero:
                print(
                    f"tuner: stopped at step {trainer.global_step}; checkpoint in {output_dir / 'checkpoints'}; "
                    "continue with resume_from_checkpoint=latest"
                )
            checkpoints = next(c for c in trainer.callbacks if isinstance(c, StepCheckpoint))
            if checkpoints.preempted_by is not None:
                from tuner.runtime.cluster import requeue

                requeue(checkpoints.preempted_by, checkpoints.requeue_handler)
            return False
    return True


def finish(trainer, module, output_dir: Path, started: float | None = None) -> float | None:
    """The final export when fit had nothing to do, the closing line, and the sweep metric."""
    from callbacks.checkpoints import FinalExport

    export = next(c for c in trainer.callbacks if isinstance(c, FinalExport))
    if not export.done:  # fit had nothing to do: the seed's early end (max_train_steps <= the resumed step)
        export.export(trainer, module)
        for callback in trainer.callbacks:
            if hasattr(callback, "push_final"):
                callback.push_final()
    if trainer.is_global_zero:
        took = f" in {time.monotonic() - started:.0f} s" if started else ""
        print(f"tuner: trained to step {trainer.global_step}{took}; weights: {export.weights}; outputs: {output_dir}")
    # The sweep metric: the validation loss when validation ran (comparable across jobs), else the
    # final epoch-mean train loss.
    val_loss = next((c.last_loss for c in trainer.callbacks if getattr(c, "last_loss", None) is not None), None)
    if val_loss is not None:
        return val_loss
    metrics = trainer.callback_metrics
    loss = metrics.get("train/loss_epoch", metrics.get("train/loss_step"))
    return float(loss) if loss is not None else None
