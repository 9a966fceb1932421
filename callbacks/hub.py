"""Publish checkpoints and the final weights to the Hugging Face Hub while training runs.

Uploads run on one background thread, in order, so training never waits on the network and commits
never race each other. A failed upload is retried with exponential backoff and then logged as an
error: losing a push must never cost the run, and local files are only ever read.

The token is resolved by ``huggingface_hub`` (``HF_TOKEN`` or ``hf auth login``) unless one is given;
it stays in memory only: not in logs, the callback's state, its repr or any file.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

import lightning as L

from callbacks.model_card import IMAGE_SUFFIXES, latest_validation_dir, write_model_card

log = logging.getLogger(__name__)

CKPT_NAME = "checkpoint.ckpt"
FINAL_WEIGHTS = ("pytorch_lora_weights.safetensors", "pipeline")
# Checkpoint folders hold the Lightning state for resuming; only the diffusers weights are published.
CHECKPOINT_IGNORE = ["*.ckpt", "tracker_state.json", ".*", "*/.*"]
# A 4xx other than these will not get better by asking again.
RETRYABLE_CLIENT_ERRORS = {408, 409, 425, 429}


class HubUploadCallback(L.Callback):
    """Push ``<output_dir>/checkpoints/<step>/`` weights as they appear, and the final weights, model
    card and latest validation images at the end of training (global rank 0 only)."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        model_name: str,
        push_checkpoints: bool = True,
        private: bool = False,
        endpoint: str | None = None,
        token: str | None = None,
        max_retries: int = 5,
        backoff_s: float = 2.0,
        card_info: dict | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.model_name = model_name
        self.push_checkpoints = push_checkpoints
        self.private = private
        self.endpoint = endpoint
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = backoff_s
        self.card_info = dict(card_info or {})
        self.__token = token  # name-mangled and never serialised; None lets huggingface_hub resolve it
        self._api: Any = None
        self._repo_id: str | None = None
        self._repo_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []
        self._seen: set[str] = set()
        self._stop = threading.Event()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_name={self.model_name!r}, push_checkpoints={self.push_checkpoints})"

    def __getstate__(self) -> dict:
        """Picklable for spawned workers: the live uploader (threads, locks, client) is rebuilt there."""
        state = self.__dict__.copy()
        for key in ("_api", "_repo_lock", "_executor", "_futures", "_stop"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._api, self._executor, self._futures = None, None, []
        self._repo_lock, self._stop = threading.Lock(), threading.Event()

    @property
    def repo_id(self) -> str | None:
        """The full ``namespace/name`` the Hub gave the repo, once it is created."""
        return self._repo_id

    # ----------------------------------------------------------------- Lightning hooks

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._stop.clear()
        # Checkpoints already on disk come from an earlier run (a resume): that run pushed them.
        self._seen.update(self._complete_checkpoints())
        self._submit("create repo", lambda: None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.is_global_zero:
            self._queue_new_checkpoints()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._queue_new_checkpoints()
        self.card_info.setdefault("steps", trainer.global_step)
        self.push_final()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Uploads already queued still finish (a checkpoint is worth keeping), but without long backoffs.
        self._stop.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    # ----------------------------------------------------------------- public API

    def push_final(self) -> bool:
        """Write the model card, then upload it with the final weights and the latest validation images,
        after any pending checkpoint uploads. Blocks until done; True when the upload succeeded."""
        self.wait()
        info = {"repo_id": self._repo_id or self.model_name, **self.card_info}
        try:
            write_model_card(self.output_dir, info)
        except Exception as exc:  # a card is nice to have; the weights still go up without one
            log.error("hub: could not write the model card: %s", _scrub(str(exc), self.__token))
        # The weights and their variants written beside them (the EMA's ``*_ema``).
        # transformer_lora*/: the peft adapter folder of families whose pipeline has no LoRA loader (PixArt-Sigma).
        patterns = ["README.md", "pytorch_lora_weights*.safetensors", "pipeline/*", "pipeline_ema/*", "transformer_lora*/*"]
        if not any((self.output_dir / name).exists() for name in FINAL_WEIGHTS):
            log.warning("hub: no final weights in %s yet (%s); pushing the card only", self.output_dir, FINAL_WEIGHTS)
        folder = latest_validation_dir(self.output_dir)
        if folder is not None:
            rel = folder.relative_to(self.output_dir).as_posix()
            patterns += [f"{rel}/*{suffix}" for suffix in IMAGE_SUFFIXES]

        def upload() -> None:
            self._api_client().upload_folder(
                repo_id=self._repo_id,
                folder_path=str(self.output_dir),
                allow_patterns=patterns,
                commit_message="Final weights and model card",
            )

        future = self._submit("final weights", upload)
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        return future is not None and future.result() is True

    def wait(self, timeout: float | None = None) -> bool:
        """Join the uploads queued so far; False if some are still running after ``timeout`` seconds."""
        pending = [f for f in self._futures if not f.done()]
        _, not_done = wait_futures(pending, timeout=timeout)
        self._futures = [f for f in self._futures if not f.done()]
        return not not_done

    def state_dict(self) -> dict:
        return {}  # nothing to resume, and never the token

    # ----------------------------------------------------------------- internals

    def _complete_checkpoints(self) -> list[str]:
        """Step folders holding a whole checkpoint. A cheap listdir: this runs every batch."""
        root = self.output_dir / "checkpoints"
        try:
            names = os.listdir(root)
        except OSError:
            return []
        return sorted((n for n in names if n.isdigit() and os.path.isfile(root / n / CKPT_NAME)), key=int)

    def _queue_new_checkpoints(self) -> None:
        for step in self._complete_checkpoints():
            if step in self._seen:
                continue
            self._seen.add(step)
            if self.push_checkpoints:
                self._submit(f"checkpoint {step}", lambda step=step: self._upload_checkpoint(step))

    def _upload_checkpoint(self, step: str) -> None:
        folder = self.output_dir / "checkpoints" / step
        if not folder.is_dir():  # pruned by checkpoints_total_limit before its turn came
            log.warning("hub: checkpoint %s was removed locally before it could be uploaded; skipped", step)
            return
        self._api_client().upload_folder(
            repo_id=self._repo_id,
            folder_path=str(folder),
            path_in_repo=f"checkpoints/{step}",
            ignore_patterns=list(CHECKPOINT_IGNORE),
            commit_message=f"Checkpoint at step {step}",
        )

    def _api_client(self) -> Any:
        """The HfApi, with the repo created on first use (exist_ok: a resumed run reuses it)."""
        with self._repo_lock:
            if self._api is None:
                from huggingface_hub import HfApi

                self._api = HfApi(endpoint=self.endpoint, token=self.__token)
            if self._repo_id is None:
                url = self._api.create_repo(self.model_name, private=self.private, exist_ok=True)
                self._repo_id = getattr(url, "repo_id", None) or self.model_name
                log.info("hub: pushing to %s", self._repo_id)
            return self._api

    def _submit(self, label: str, fn: Callable[[], None]) -> Future | None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload")
        try:
            future = self._executor.submit(self._with_retries, label, fn)
        except RuntimeError:  # shut down after an exception in training
            log.error("hub: %s not uploaded: the uploader has stopped", label)
            return None
        self._futures.append(future)
        return future

    def _with_retries(self, label: str, fn: Callable[[], None]) -> bool:
        """Run ``fn`` (repo creation included) until it succeeds; never raise into training."""
        for attempt in range(self.max_retries + 1):
            try:
                self._api_client()
                fn()
                log.info("hub: %s done", label)
                return True
            except Exception as exc:
                message = _scrub(f"{type(exc).__name__}: {exc}", self.__token)
                status = getattr(getattr(exc, "response", None), "status_code", None)
                permanent = status is not None and 400 <= status < 500 and status not in RETRYABLE_CLIENT_ERRORS
                if permanent or attempt == self.max_retries:
                    log.error(
                        "hub: %s failed after %d attempt(s); local files are kept: %s", label, attempt + 1, message
                    )
                    return False
                delay = self.backoff_s * 2**attempt
                log.warning("hub: %s failed (attempt %d), retrying in %.1fs: %s", label, attempt + 1, delay, message)
                self._stop.wait(delay)  # returns at once after an exception in training
        return False


def _scrub(text: str, token: str | None) -> str:
    """Hide any token that an error message might echo (a URL, a header)."""
    try:
        from huggingface_hub import get_token

        known = [t for t in (token, get_token()) if t]
    except Exception:
        known = [token] if token else []
    for secret in known:
        text = text.replace(secret, "***")
    return re.sub(r"\bhf_[A-Za-z0-9]{8,}", "hf_***", text)
