"""One training run per workdir: a lock file naming its holder, kept fresh by a heartbeat.

`<workdir>/run.lock` holds JSON `{"host", "pid", "run_id", "started", "heartbeat"}` (times in
seconds since the epoch). A run that finds a lock decides whether its holder is gone:

- same host: the holder is gone when its pid is no longer alive (a SIGKILLed run), when that pid
  now belongs to a process started later (pid reuse), or when the host has rebooted since (its
  boot id changed: a preempted TPU VM that came back under the same name);
- another host, or a host that cannot see the holder's processes: the holder is gone when its
  heartbeat is older than `stale_after_s` (the holder rewrites the heartbeat every
  `stale_after_s / 4` seconds from a background thread). Clocks of the hosts sharing a workdir
  must agree to well within `stale_after_s`.

A live holder makes `acquire` raise `WorkdirLockedError` naming its host and pid; a stale lock is
taken over with a warning. Local workdirs create the lock with O_EXCL; object stores (`gs://`) have
no exclusive create through epath, so the lock is written, read back after a short settle time and
kept only if it still names this run (two runs starting within that window may both see their own
lock; that race is narrow and documented).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from engram_jax import storage

logger = logging.getLogger(__name__)

LOCK_FILENAME = "run.lock"
_SETTLE_S = 1.0  # object stores: how long to wait before reading a written lock back


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _boot_id() -> str | None:
    """This boot of the host (Linux); a host restarted after a preemption has another one."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """When `pid` started, in clock ticks since boot (Linux): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            # Field 22; the command name (field 2) may hold spaces, so split after its ")".
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class WorkdirLock:
    """The lock of one workdir; `acquire()` / `release()`, or use it as a context manager.

    Args:
      workdir: local directory or URL.
      stale_after_s: a holder on another host is presumed dead when its heartbeat is older.
    """

    def __init__(self, workdir: str, *, stale_after_s: float = 300.0):
        if not stale_after_s > 0:
            raise ValueError(f"WorkdirLock: stale_after_s={stale_after_s}; expected > 0")
        self.path = storage.join(workdir, LOCK_FILENAME)
        self.stale_after_s = float(stale_after_s)
        self._record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "boot_id": _boot_id(),
            "pid_start": _start_time(os.getpid()),
            "run_id": uuid.uuid4().hex,
            "started": time.time(),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False

    def _body(self) -> str:
        return json.dumps({**self._record, "heartbeat": time.time()})

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(storage.read_text(self.path))
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # unreadable (a write torn by a crash): treated as stale
        return holder if isinstance(holder, dict) else {}

    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why `holder` is gone, or None while it may still be running."""
        if not holder or "pid" not in holder:
            return "the lock file is unreadable"
        if holder.get("host") == self._record["host"]:
            pid = int(holder["pid"])
            if holder.get("boot_id") and holder["boot_id"] != self._record["boot_id"]:
                return "this host has restarted since the lock was taken"
            if not _pid_alive(pid):
                return f"pid {pid} is not running on this host"
            if holder.get("pid_start") and holder["pid_start"] != _start_time(pid):
                return f"pid {pid} is now another process (the holder's has ended)"
            return None
        age = time.time() - float(holder.get("heartbeat", 0.0))
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)"
        return None

    def acquire(self) -> None:
        """Takes the lock, or raises `WorkdirLockedError` naming the live holder."""
        holder = self._read()
        if holder is not None:
            reason = self._stale_reason(holder)
            if reason is None:
                raise WorkdirLockedError(self._held_message(holder))
            logger.warning(
                "%s: taking over the lock of host %s pid %s: %s",
                self.path,
                holder.get("host"),
                holder.get("pid"),
                reason,
            )
            storage.remove(self.path)
        self._create()
        self._held = True
        self._thread = threading.Thread(target=self._heartbeat, name="workdir_lock", daemon=True)
        self._thread.start()

    def _create(self) -> None:
        if storage.is_url(self.path):
            storage.write_text(self.path, self._body())
            time.sleep(_SETTLE_S)
            holder = self._read() or {}
            if holder.get("run_id") != self._record["run_id"]:
                raise WorkdirLockedError(self._held_message(holder))
            return
        storage.makedirs(os.path.dirname(os.path.abspath(self.path)))
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            # Another run created it between our read and our create.
            raise WorkdirLockedError(self._held_message(self._read() or {})) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self._body())

    def _held_message(self, holder: dict[str, Any]) -> str:
        started = holder.get("started")
        since = (
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
            if isinstance(started, (int, float))
            else "an unknown time"
        )
        return (
            f"workdir is in use: {self.path} is held by host {holder.get('host')!r} pid "
            f"{holder.get('pid')} (running since {since}); two runs on one workdir would corrupt "
            "each other's checkpoints and metrics. Stop that run or use another workdir; a lock "
            "left by a killed run is taken over automatically (same host: once its pid is gone; "
            f"other hosts: once its heartbeat is {self.stale_after_s:.0f} s old)"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_after_s / 4):
            try:
                holder = self._read()
                if holder is not None and holder.get("run_id") != self._record["run_id"]:
                    logger.error("%s: the lock was taken over by %s", self.path, holder)
                    return
                storage.write_text(self.path, self._body())
            except Exception:  # a transient storage error must not kill training
                logger.exception("%s: heartbeat failed", self.path)

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock if it is still this run's."""
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder is not None and holder.get("run_id") == self._record["run_id"]:
            with contextlib.suppress(FileNotFoundError):
                storage.remove(self.path)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
