"""Training metrics: a background writer (`metrics.jsonl` + TensorBoard, process 0 only) and a
progress display (tqdm on a terminal, periodic log lines otherwise).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import IO, Any

import jax
import numpy as np

from engram_jax import storage

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"


def _flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss": {"lm": x}} -> {"loss/lm": x}; checks, in the caller, that leaves are scalars."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_metrics(value, f"{name}/"))
            continue
        if isinstance(value, (bool, int, float, np.generic)):
            flat[name] = value
            continue
        size = getattr(value, "size", None)  # jax.Array / np.ndarray: shape known without a sync
        if size != 1:
            raise TypeError(
                f"metrics[{name!r}]: got {type(value).__name__} with shape "
                f"{getattr(value, 'shape', None)}; expected a scalar"
            )
        flat[name] = value
    return flat


def _to_float(value: Any) -> float:
    """Python float of a scalar (device values are fetched here, in the writer thread)."""
    return float(np.asarray(value).reshape(()))


class MetricsWriter:
    """Writes scalar metrics from a background thread, so the training loop never waits on I/O.

    Each `write(step, metrics)` becomes one JSON line in `<workdir>/metrics.jsonl`:
    `{"step": 100, "loss": 3.2, "moe/load_max": 1.1}` (nested dicts flattened with "/"), and one
    TensorBoard scalar per key under `<workdir>/tensorboard` (tensorboardX). Values may be
    Python/numpy scalars or size-1 `jax.Array`s; device values are fetched in the writer thread.
    Non-finite values (NaN, +-inf) are written as JSON `null` (strict JSON, readable by any parser;
    `read_metrics` turns them back into NaN) and as their float value in TensorBoard.

    Resuming: with `resume_step`, rows of a step past it (written by a run killed after its last
    checkpoint, which the resumed run computes again) are dropped from `metrics.jsonl` when the
    writer opens, and TensorBoard is told to discard its events from `resume_step + 1` on (the
    event file's purge marker). Without it, rows are appended to what is there.

    Workdir URLs (`gs://...`): object stores cannot append, so the writer keeps the file's rows in
    memory and uploads the whole `metrics.jsonl` again at most every `sync_every_s` seconds, on
    `flush` and on `close`; TensorBoard events are written to a local temporary directory and
    copied to `<workdir>/tensorboard/` at the same times. A reader always sees a complete file: the
    rows up to some recent step.

    An exception in the writer thread is stored, the thread keeps draining the queue, and the
    exception is re-raised by the next `write`, `flush` or `close`.

    Args:
      workdir: run directory or URL (created if missing).
      enabled: write anything at all; None means "only on process 0" (`jax.process_index() == 0`).
        A disabled writer is a no-op.
      use_tensorboard: also write TensorBoard event files.
      max_queue: writes buffered before `write` blocks (backpressure instead of unbounded memory).
      resume_step: the step the run restarts from (0 for a fresh start); rows past it are dropped.
        None keeps every existing row.
      sync_every_s: for URL workdirs, the most often the objects are uploaded between flushes.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool | None = None,
        use_tensorboard: bool = True,
        max_queue: int = 10_000,
        resume_step: int | None = None,
        sync_every_s: float = 30.0,
    ):
        self._enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
        self._workdir = os.fspath(workdir)
        self._remote = storage.is_url(self._workdir)
        self._sync_every_s = sync_every_s
        self._last_sync = time.monotonic()
        self._error: BaseException | None = None
        self._closed = False
        self._warned_non_finite = False
        self._thread: threading.Thread | None = None
        if not self._enabled:
            return
        storage.makedirs(self._workdir)
        self._lines, dropped = _kept_lines(self.path, resume_step)
        self._file = None
        if self._remote:
            self._upload_lines()
        else:
            if dropped:
                storage.write_text(self.path, "".join(self._lines))
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._lines = None
        self._tb = None
        self._tb_local_dir = None
        if use_tensorboard:
            import tensorboardX  # only the process that writes pays the import

            logdir = storage.join(self._workdir, TENSORBOARD_DIRNAME)
            if self._remote:
                self._tb_local_dir = tempfile.mkdtemp(prefix="engram_jax_tensorboard_")
                logdir = self._tb_local_dir
            self._tb = tensorboardX.SummaryWriter(
                logdir=logdir,
                purge_step=None if resume_step is None else resume_step + 1,
            )
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="metrics_writer", daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        """Whether this writer writes (False on processes other than 0 by default)."""
        return self._enabled

    @property
    def path(self) -> str:
        """Path (or URL) of the JSON-lines file."""
        return storage.join(self._workdir, METRICS_FILENAME)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Queues one row of scalars for `step`.

        Args:
          step: training step.
          metrics: possibly nested dict of scalars; the key "step" is reserved.

        Raises:
          TypeError: a value is not a scalar, or a key is "step".
          RuntimeError: the writer is closed.
          Exception: a stored failure of the writer thread.
        """
        if not self._enabled:
            return
        self._raise_if_failed()
        if self._closed:
            raise RuntimeError("MetricsWriter.write: the writer is closed")
        flat = _flatten_metrics(metrics)
        if "step" in flat:
            raise TypeError("MetricsWriter.write: metric key 'step' is reserved for the step")
        self._queue.put(("write", int(step), flat))

    def flush(self) -> None:
        """Blocks until everything queued so far is stored; re-raises a writer failure."""
        if not self._enabled or self._closed:
            self._raise_if_failed()
            return
        done = threading.Event()
        self._queue.put(("flush", done, None))
        while not done.wait(timeout=1.0):
            if not self._thread.is_alive():  # defensive: never hang on a dead thread
                break
        self._raise_if_failed()

    def close(self) -> None:
        """Writes what is queued, stops the thread and closes the files; re-raises a failure."""
        if not self._enabled or self._closed:
            self._raise_if_failed()
            return
        self._closed = True
        self._queue.put(("close", None, None))
        self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _raise_if_failed(self) -> None:
        """Re-raises (once) an exception stored by the writer thread."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        """Writer thread: drains the queue until the close token."""
        try:
            while True:
                kind, a, b = self._queue.get()
                if kind == "close":
                    self._safely(self._close_files)
                    return
                if kind == "flush":
                    self._safely(self._flush_files, True)
                    a.set()
                    continue
                self._safely(self._write_row, a, b)
                if self._queue.empty():
                    self._safely(self._flush_files, False)
        finally:
            # Never leave a flusher waiting if the loop dies.
            while not self._queue.empty():
                kind, a, _ = self._queue.get_nowait()
                if kind == "flush":
                    a.set()

    def _safely(self, fn, *args) -> None:
        """Runs fn unless a failure is already stored; stores the first failure."""
        if self._error is not None:
            return
        try:
            fn(*args)
        except Exception as e:  # re-raised in the caller's thread
            logger.exception("metrics writer thread failed")
            self._error = e

    def _write_row(self, step: int, flat: dict[str, Any]) -> None:
        """One JSON line and the TensorBoard scalars of one step."""
        values = {key: _to_float(value) for key, value in flat.items()}
        row: dict[str, Any] = {"step": step}
        for key, value in values.items():
            finite = math.isfinite(value)
            if not finite and not self._warned_non_finite:
                logger.warning("metric %r is %s at step %d (written as null)", key, value, step)
                self._warned_non_finite = True
            row[key] = value if finite else None
        line = json.dumps(row, allow_nan=False) + "\n"
        if self._file is not None:
            self._file.write(line)
        else:
            self._lines.append(line)
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, global_step=step)

    def _upload_lines(self) -> None:
        storage.write_text(self.path, "".join(self._lines or []))

    def _flush_files(self, force: bool) -> None:
        """Flushes the JSON lines and TensorBoard buffers (uploads them for URL workdirs, when
        forced or `sync_every_s` has passed)."""
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        if self._remote and (force or time.monotonic() - self._last_sync >= self._sync_every_s):
            self._sync_remote()

    def _sync_remote(self) -> None:
        """Uploads the whole metrics file and every local TensorBoard event file."""
        self._upload_lines()
        if self._tb_local_dir is not None:
            remote_dir = storage.join(self._workdir, TENSORBOARD_DIRNAME)
            for name in sorted(os.listdir(self._tb_local_dir)):
                storage.copy_file(
                    os.path.join(self._tb_local_dir, name), storage.join(remote_dir, name)
                )
        self._last_sync = time.monotonic()

    def _close_files(self) -> None:
        """Closes both outputs (after a last upload for URL workdirs)."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._remote:
            self._sync_remote()
            if self._tb_local_dir is not None:
                shutil.rmtree(self._tb_local_dir, ignore_errors=True)


def _kept_lines(path: str, resume_step: int | None) -> tuple[list[str], int]:
    """Lines of an existing metrics file whose step is at most `resume_step` (all of them for
    None), and how many were dropped. Lines that do not parse are kept unchanged."""
    if not storage.exists(path):
        return [], 0
    lines = storage.read_text(path).splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"  # a run killed mid-line: the next row goes on its own line
    if resume_step is None:
        return lines, 0
    kept = []
    for line in lines:
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            step = None
        if not (isinstance(step, int) and step > resume_step):
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        logger.info("%s: dropped %d rows past the restored step %d", path, dropped, resume_step)
    return kept, dropped


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a `metrics.jsonl` file (or of `<workdir>/metrics.jsonl` given a directory); local
    paths and URLs (`gs://...`) alike. This is the one reader of the file: use it everywhere.

    `null` values (non-finite metrics) come back as NaN.
    """
    path = os.fspath(path)
    if storage.isdir(path):
        path = storage.join(path, METRICS_FILENAME)
    rows = []
    for line_number, line in enumerate(storage.read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_number}: not a JSON object: {e}") from e
        rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
    return rows


class Progress:
    """Progress of the training loop: a tqdm bar with ETA on a terminal, log lines otherwise.

    On a TTY (or `use_tqdm=True`) a tqdm bar shows step/total, rate and ETA with the latest metrics
    as postfix. Otherwise (logs redirected to a file, a cluster job) one `logging` INFO line every
    `log_every` steps and at the last step:
    `step 200/1000 (20.0%) | loss 3.1234 | tokens/s 12,345 | elapsed 0:01:02 | ETA 0:04:08`.
    The rate (and so ETA and tokens/s) is measured from the first `update`, which keeps the first
    step's compilation out of it.

    Args:
      total_steps: last step of the run.
      enabled: None means "only on process 0".
      initial_step: step the run starts (or resumes) from.
      log_every: steps between log lines (non-TTY mode).
      tokens_per_step: global tokens per step, for tokens/s; None omits it.
      stream: where tqdm writes and whose `isatty()` picks the mode (default stderr).
      use_tqdm: force the mode; None picks tqdm when `stream` is a TTY.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        enabled: bool | None = None,
        initial_step: int = 0,
        log_every: int = 100,
        tokens_per_step: int | None = None,
        stream: IO[str] | None = None,
        use_tqdm: bool | None = None,
    ):
        if log_every < 1:
            raise ValueError(f"Progress: log_every={log_every}; expected >= 1")
        if not 0 <= initial_step <= total_steps:
            raise ValueError(
                f"Progress: initial_step={initial_step}; expected in [0, total_steps={total_steps}]"
            )
        self._enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
        self._total = int(total_steps)
        self._log_every = int(log_every)
        self._tokens_per_step = tokens_per_step
        self._step = int(initial_step)
        self._first: tuple[float, int] | None = None  # (time, step) of the first update
        self._bar = None
        stream = sys.stderr if stream is None else stream
        if use_tqdm is None:
            use_tqdm = bool(getattr(stream, "isatty", lambda: False)())
        if self._enabled and use_tqdm:
            import tqdm

            self._bar = tqdm.tqdm(
                total=self._total, initial=self._step, file=stream, unit="step", dynamic_ncols=True
            )

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Reports that `step` is done, with optional scalar metrics (e.g. loss)."""
        if not self._enabled:
            return
        step = int(step)
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
        shown = {k: _to_float(v) for k, v in _flatten_metrics(metrics or {}).items()}
        if self._bar is not None:
            self._bar.update(step - self._step)
            if shown:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif step % self._log_every == 0 or step == self._total:
            logger.info("%s", self._line(step, now, shown))
        self._step = step

    def _line(self, step: int, now: float, shown: Mapping[str, float]) -> str:
        """One plain progress line."""
        parts = [f"step {step}/{self._total} ({100.0 * step / max(self._total, 1):.1f}%)"]
        parts += [f"{k} {v:.4f}" for k, v in shown.items()]
        t0, s0 = self._first
        rate = (step - s0) / (now - t0) if step > s0 and now > t0 else None
        if rate is not None and self._tokens_per_step:
            parts.append(f"tokens/s {rate * self._tokens_per_step:,.0f}")
        parts.append(f"elapsed {_duration(now - t0)}")
        if rate is not None:
            parts.append(f"ETA {_duration((self._total - step) / rate)}")
        return " | ".join(parts)

    def close(self) -> None:
        """Closes the bar (no-op in log mode)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _duration(seconds: float) -> str:
    """H:MM:SS."""
    return str(datetime.timedelta(seconds=round(seconds)))


# Dense bf16 matmul peak per chip (FLOP/s), from the vendors' data sheets; used for MFU.
_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}
_measured_peak: dict[str, float] = {}


def peak_flops_per_second(device: Any = None) -> float:
    """Peak matmul FLOP/s of one device, the denominator of MFU.

    Accelerators use their data-sheet bf16 figure; any other device (a CPU, an unknown chip) is
    measured once per process with a jitted float32 1024x1024 matmul, so CPU MFU compares against
    what this machine actually achieves.
    """
    import jax
    import jax.numpy as jnp

    device = device or jax.devices()[0]
    kind = device.device_kind
    for name, flops in _PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    if kind not in _measured_peak:
        n = 1024
        a = jnp.ones((n, n), jnp.float32)
        matmul = jax.jit(lambda x: x @ x)
        matmul(a).block_until_ready()
        samples = []
        for _ in range(7):
            start = time.perf_counter()
            matmul(a).block_until_ready()
            samples.append(time.perf_counter() - start)
        # Median of several timings: one slow sample under load must not halve the peak.
        _measured_peak[kind] = 2 * n**3 / statistics.median(samples)
    return _measured_peak[kind]
