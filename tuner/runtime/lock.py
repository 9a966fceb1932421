"""One run per output directory: ``<output_dir>/.tuner.lock``.

Two runs writing into one folder corrupt each other (interleaved logs, one run pruning or setting aside
the other's checkpoints, the last to finish overwriting the other's weights). So a run holds an
exclusive lock on its output directory from before it writes anything until it exits; only rank 0
takes it under DDP (the other ranks are its children).

- The lock is an ``flock`` on the file, so the kernel drops it when its holder dies, even by kill -9;
  the file also records the holder (host, PID, process start time, command) for the error message.
- A lock file left by a process of this host that is gone is taken over (``stale`` says whose it was;
  the run logs it as a warning).
- A lock file written on another host (a shared filesystem) cannot be checked from here: the run is
  refused, and the message says how to clear it if that job is really gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: the PID check below is all there is
    fcntl = None

LOCK_NAME = ".tuner.lock"


class OutputDirLocked(RuntimeError):
    """Another run holds this output directory; the message is one line for the user."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), which tells a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    now = _process_start(pid)
    return start is None or now is None or now == start


def _describe(holder: dict) -> str:
    started = holder.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "at an unknown time"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"


class RunLock:
    """``acquire()`` or raise OutputDirLocked; ``release()`` on the way out (also safe to call twice)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None
        self.stale: str | None = None  # the holder of a lock left by a dead process, when taken over

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise OutputDirLocked(
                    f"output_dir {self.path.parent} is in use by another run ({_describe(holder)}); wait for it "
                    "to finish, stop it, or choose another output_dir"
                ) from None
            if not _same_file(fd, self.path):  # its holder released and removed it meanwhile: try again
                os.close(fd)
                continue
            try:
                self._take_over(fd, _read(fd))
            except OutputDirLocked:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise OutputDirLocked(f"output_dir {self.path.parent}: could not take {self.path} (it keeps changing)")

    def _take_over(self, fd: int, previous: dict) -> None:
        host = socket.gethostname()
        if previous:
            if previous.get("host") != host:
                raise OutputDirLocked(
                    f"output_dir {self.path.parent} is locked by a run on another host ({_describe(previous)}); "
                    f"if that run is no longer alive, remove the lock with: rm {self.path}"
                )
            pid = int(previous.get("pid", -1))
            if pid != os.getpid() and pid > 0 and _alive(pid, previous.get("process_start")):
                # Alive but not holding the flock: a filesystem without locks. Its record still counts.
                raise OutputDirLocked(
                    f"output_dir {self.path.parent} is in use by another run ({_describe(previous)}); wait for it "
                    "to finish, stop it, or choose another output_dir"
                )
            self.stale = _describe(previous)  # reported by the run once its log is set up
        record = {
            "host": host,
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "started_at": time.time(),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                self.path.unlink()  # removed while still locked, so no one takes a file about to vanish
        finally:
            os.close(fd)


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 65536, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
