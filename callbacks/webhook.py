"""The webhook's Lightning callback: what a run reports, and when. Delivery, the config file and the
secret handling are in ``callbacks.webhook_sender``, re-exported here."""

from __future__ import annotations

import dataclasses
import logging
import os
import traceback
from typing import Any

import lightning as L

from callbacks.webhook_sender import (  # noqa: F401 - re-exported
    DISCORD_CONTENT_LIMIT,
    WebhookConfig,
    WebhookSender,
    load_webhook_config,
)

log = logging.getLogger("callbacks.webhook")


class WebhookCallback(L.Callback):
    """Startup summary, periodic status, validation images, fatal errors and completion, from rank 0 only.

    The config is read (and validated) at construction, so a bad webhook.json fails before any weight
    loads. The sender is created in ``setup`` on global rank 0 only, so other ranks never open a socket
    and the callback stays picklable until then. Other callbacks post through :meth:`send_images` and
    :meth:`notify`; before ``setup`` and on other ranks those are no-ops returning False.
    """

    TRACEBACK_LINES = 15

    def __init__(
        self,
        config: str | os.PathLike | WebhookConfig,
        status_every_n_steps: int = 100,
        run_summary: dict | None = None,
        default_prefix: str | None = None,
        close_timeout: float = 2.0,
    ):
        cfg = config if isinstance(config, WebhookConfig) else load_webhook_config(config)
        if cfg.message_prefix is None and default_prefix:
            # The seed: an unset prefix defaults to the tracker project and run name.
            cfg = dataclasses.replace(cfg, message_prefix=str(default_prefix))
        self.config = cfg
        self.status_every_n_steps = int(status_every_n_steps or 0)
        self.run_summary = dict(run_summary or {})
        self.close_timeout = float(close_timeout)
        self._sender: WebhookSender | None = None
        self._base_sent = 0  # from closed senders and from a restored checkpoint
        self._base_dropped = 0
        self._last_status_step = -1

    def __repr__(self) -> str:
        return f"WebhookCallback(config={self.config!r}, status_every_n_steps={self.status_every_n_steps})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_sender"] = None  # a thread cannot be pickled; the new process makes its own in setup
        return state

    # sender lifecycle --------------------------------------------------------------------------------
    def _make_sender(self) -> WebhookSender:
        """Overridable seam (tests, tuning): the sender this callback posts through."""
        return WebhookSender(self.config)

    def _close_sender(self) -> None:
        sender, self._sender = self._sender, None
        if sender is None:
            return
        sender.close(self.close_timeout)
        self._base_sent += sender.sent
        self._base_dropped += sender.dropped

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._sender is None and _is_global_zero(trainer):
            self._sender = self._make_sender()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close_sender()

    # public surface for other callbacks ---------------------------------------------------------------
    def notify(self, text: str, level: str = "info") -> bool:
        """Post one line (e.g. 'checkpoint saved'); False when nothing was queued."""
        return self._sender.send(level, text) if self._sender is not None else False

    def send_images(self, title: str, images: list[tuple[str, bytes]]) -> bool:
        """Post one prompt's images (``(filename, PNG bytes)``), ten per message, at level info."""
        if self._sender is None:
            return False
        return self._sender.send("info", title, list(images))

    # hooks -------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._sender is None:
            return
        self._last_status_step = trainer.global_step
        lines = ["**Training started**"]
        lines += [f"- {k}: {_fmt(v)}" for k, v in self.run_summary.items()]
        bits = []
        for label, attr in (("max_steps", "max_steps"), ("max_epochs", "max_epochs"), ("devices", "world_size")):
            value = getattr(trainer, attr, None)
            if isinstance(value, int) and value > 0:
                bits.append(f"{label}={value}")
        precision = getattr(trainer, "precision", None)
        if precision:
            bits.append(f"precision={precision}")
        if bits:
            lines.append("- trainer: " + ", ".join(bits))
        if trainer.global_step > 0:
            lines.append(f"- resuming at step {trainer.global_step}")
        self._sender.send("info", "\n".join(lines))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self._sender is None or self.status_every_n_steps <= 0:
            return
        step = trainer.global_step
        # With gradient accumulation several batches share one global step: report each step once.
        if step <= 0 or step == self._last_status_step or step % self.status_every_n_steps:
            return
        self._last_status_step = step
        self._sender.send("info", self._status_line(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._sender is None:
            return
        if isinstance(exception, KeyboardInterrupt):
            self._sender.send("warning", f"**Training interrupted** at step {trainer.global_step}", urgent=True)
        else:
            self._sender.send("critical", self._fatal_message(trainer, exception), urgent=True)
        self._close_sender()  # Lightning re-raises next: deliver before the process goes away

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._sender is None:
            return
        loss = _metric(trainer, "train/loss_step")
        text = f"**Training complete** at step {trainer.global_step}"
        if loss is not None:
            text += f", last loss {loss:.4g}"
        self._sender.send("info", text, urgent=True)  # ahead of any backlog, so it is what gets through
        # The sender closes in ``teardown``, which Lightning calls after every callback's on_train_end,
        # so final validation images posted by a callback later in the list still go out.

    # checkpointed counters ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Only counters: the URL and the config never reach a checkpoint."""
        sender = self._sender
        sent = self._base_sent + (sender.sent if sender else 0)
        dropped = self._base_dropped + (sender.dropped if sender else 0)
        return {"sent": int(sent), "dropped": int(dropped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._base_sent = int(state_dict.get("sent", 0))
        self._base_dropped = int(state_dict.get("dropped", 0))

    # message building --------------------------------------------------------------------------------
    def _status_line(self, trainer: L.Trainer) -> str:
        step = trainer.global_step
        max_steps = getattr(trainer, "max_steps", -1)
        parts = [
            f"epoch {trainer.current_epoch}",
            f"step {step}" + (f"/{max_steps}" if max_steps and max_steps > 0 else ""),
        ]
        loss = _metric(trainer, "train/loss_step")
        parts.append(f"loss {loss:.4g}" if loss is not None else "loss n/a")
        lr = _learning_rate(trainer)
        parts.append(f"lr {lr:.3g}" if lr is not None else "lr n/a")
        decay = _metric(trainer, "ema/decay")
        if decay is not None:
            parts.append(f"ema decay {decay:.6g}")
        return " | ".join(parts)

    def _fatal_message(self, trainer: L.Trainer, exception: BaseException) -> str:
        name = type(exception).__name__
        detail = str(exception).strip().replace("```", "'''")
        if len(detail) > 400:
            detail = detail[:399] + "…"
        head = f"**Training failed** at step {getattr(trainer, 'global_step', '?')}: {name}: {detail}"
        tb = "".join(traceback.format_exception(type(exception), exception, exception.__traceback__))
        lines = [ln[:200] for ln in tb.replace("```", "'''").rstrip().splitlines()[-self.TRACEBACK_LINES :]]
        # Keep the end of the traceback (where it failed) and stay under Discord's limit with the prefix.
        budget = DISCORD_CONTENT_LIMIT - 100 - len(self.config.message_prefix or "")
        while lines and len(head) + sum(len(ln) + 1 for ln in lines) + 10 > budget:
            lines.pop(0)
        if not lines:
            return head[:budget]
        return head + "\n```\n" + "\n".join(lines) + "\n```"


def _is_global_zero(trainer: Any) -> bool:
    value = getattr(trainer, "is_global_zero", None)
    if value is None:
        return getattr(trainer, "global_rank", 0) == 0
    return bool(value)


def _metric(trainer: Any, key: str) -> float | None:
    metrics = getattr(trainer, "callback_metrics", None) or {}
    value = metrics.get(key) if hasattr(metrics, "get") else None
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _learning_rate(trainer: Any) -> float | None:
    try:
        optimizers = getattr(trainer, "optimizers", None) or []
        return float(optimizers[0].param_groups[0]["lr"]) if optimizers else None
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)
