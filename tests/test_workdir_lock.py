"""The workdir lock: a live holder is named, a dead one (same host: pid gone; other host: old
heartbeat) is taken over, and storage helpers write atomically."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from engram_jax import storage
from engram_jax.workdir_lock import LOCK_FILENAME, WorkdirLock, WorkdirLockedError


def _write_lock(workdir, **holder) -> None:
    with open(os.path.join(workdir, LOCK_FILENAME), "w") as f:
        json.dump({"run_id": "other", "started": 0.0, **holder}, f)


def test_live_holder_is_named_and_lock_is_released(tmp_path):
    with (
        WorkdirLock(str(tmp_path)),
        pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"),
    ):
        WorkdirLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_FILENAME).exists()


def test_stale_locks_are_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, host=socket.gethostname(), pid=dead.pid, heartbeat=time.time())
    with caplog.at_level("WARNING"), WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILENAME).read_text())["pid"] == os.getpid()
    assert f"pid {dead.pid} is not running on this host" in caplog.text

    # The same pid after a reboot, or reused by a later process, is not the holder.
    _write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), boot_id="before-reboot")
    with WorkdirLock(str(tmp_path)):
        pass
    assert "this host has restarted" in caplog.text
    _write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), pid_start="0")
    with WorkdirLock(str(tmp_path)):
        pass
    assert f"pid {os.getpid()} is now another process" in caplog.text

    # Another host's pid cannot be checked: its heartbeat decides.
    _write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time())
    with pytest.raises(WorkdirLockedError, match="host 'elsewhere' pid 1"):
        WorkdirLock(str(tmp_path), stale_after_s=60).acquire()
    _write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 120)
    with WorkdirLock(str(tmp_path), stale_after_s=60):
        pass
    assert "heartbeat is 120 s old" in caplog.text


def test_storage_writes_replace_whole_files(tmp_path):
    path = str(tmp_path / "sub" / "file.txt")
    storage.write_text(path, "one")
    storage.write_text(path, "two")
    assert storage.read_text(path) == "two"
    assert storage.listdir(tmp_path / "sub") == ["file.txt"]  # no temporary left behind
    assert storage.glob(str(tmp_path / "*" / "*.txt")) == [path]
    assert storage.is_url("gs://bucket/x") and not storage.is_url(path)
    assert storage.join("gs://bucket/run", "metrics.jsonl") == "gs://bucket/run/metrics.jsonl"
