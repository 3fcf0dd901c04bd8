"""Training metrics: a background writer (`metrics.jsonl` + TensorBoard, process 0 only) and a
progress display (tqdm on a terminal, periodic log lines otherwise).
"""

from __future__ import annotations

import datetime
import io
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
from collections.abc import Mapping, Sequence
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


def last_by_step(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in `read_metrics` rows, one value per step in step order (a
    resumed run logs some steps twice: the later row wins)."""
    by_step = {int(r["step"]): float(r[key]) for r in rows if key in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


# (metric key, shown name) of the evaluation line, in order.
_EVAL_FIELDS = (
    ("eval_loss", "loss"),
    ("eval_perplexity", "perplexity"),
    ("eval_bits_per_byte", "bits/byte"),
    ("hc_composite_forward_gain", "amax fwd"),
    ("hc_composite_backward_gain", "amax bwd"),
)


class Progress:
    """Progress of the training loop: one tqdm bar on a terminal, one short log line per log step
    otherwise.

    Both modes show the same few fields, in this order: the training loss, tokens per second and
    the learning rate (`loss 3.142 | tok/s 12.3k | lr 3.00e-04`); everything else goes only to
    `metrics.jsonl` and TensorBoard.

    * On a TTY (or `use_tqdm=True`) a tqdm bar shows step/total, elapsed time and ETA with those
      fields as a fixed postfix. While the bar is open, log records of the console handlers
      (the root logger's stream handlers and absl's) are written through `tqdm.write`, so they
      appear above the bar instead of breaking it.
    * Otherwise (logs redirected to a file, a cluster job) one `logging` INFO line every
      `log_every` steps and at the last step:
      `step 200/1000 | loss 3.123 | tok/s 12.3k | lr 3.00e-04 | elapsed 0:01:02 | ETA 0:04:08`.
      The rate behind ETA is measured from the first `update`, which keeps the first step's
      compilation out of it.

    `log_eval` writes an evaluation as one line of its main values, named, with 4 significant
    digits, in both modes.

    Args:
      total_steps: last step of the run.
      enabled: None means "only on process 0".
      initial_step: step the run starts (or resumes) from.
      log_every: steps between log lines (non-TTY mode).
      tokens_per_step: global tokens per step, for tokens/s when the metrics carry no
        `tokens_per_second`; None omits it.
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
        self._fields: dict[str, float] = {}  # latest value of each shown field
        self._caller_rate = False  # the metrics carry tokens_per_second
        self._bar = None
        self._redirected: list[tuple[logging.StreamHandler, Any]] = []
        self._stream = sys.stderr if stream is None else stream
        if use_tqdm is None:
            use_tqdm = bool(getattr(self._stream, "isatty", lambda: False)())
        # The bar opens at the first update, so its elapsed time and ETA leave out the first
        # step's compilation (which can take longer than many steps).
        self._use_tqdm = self._enabled and use_tqdm

    def _open_bar(self, step: int) -> None:
        import tqdm

        stream = self._stream
        # A pseudo-terminal without a size (some job runners) reports 0 columns, in which
        # tqdm draws nothing: use a fixed size there.
        sized = _terminal_columns(stream) > 0
        self._bar = tqdm.tqdm(
            total=self._total,
            initial=step,
            file=stream,
            unit="step",
            dynamic_ncols=sized,
            ncols=None if sized else 100,
            nrows=None if sized else 20,
            # No rate: tok/s in the postfix says it better, and the bar keeps its width.
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
        )
        self._redirect_console_logging(stream)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Reports that `step` is done, with its metrics (`train_loss`, `tokens_per_second`,
        `learning_rate` are shown; others are ignored)."""
        if not self._enabled:
            return
        step = int(step)
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
            if self._use_tqdm:
                self._open_bar(step)
                self._step = step
        self._update_fields(step, now, metrics or {})
        if self._bar is not None:
            self._bar.update(step - self._step)
            if self._fields:
                self._bar.set_postfix_str(self._postfix(", "), refresh=False)
        elif step % self._log_every == 0 or step == self._total:
            logger.info("%s", self._line(step, now))
        self._step = step

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One line of an evaluation's main values, named, 4 significant digits, e.g.
        `eval step 100 | loss 3.142 | perplexity 23.15 | bits/byte 1.234 | amax fwd 1 | amax bwd 1`
        (the mHC composite Amax gains when present; every other value only in metrics.jsonl)."""
        if not self._enabled:
            return
        parts = [f"eval step {int(step)}"]
        for key, name in _EVAL_FIELDS:
            if key in metrics:
                parts.append(f"{name} {_to_float(metrics[key]):.4g}")
        logger.info("%s", " | ".join(parts))

    def _update_fields(self, step: int, now: float, metrics: Mapping[str, Any]) -> None:
        """Keeps the latest loss, tokens/s and learning rate."""
        for key, name in (("train_loss", "loss"), ("loss", "loss"), ("learning_rate", "lr")):
            if key in metrics:
                self._fields[name] = _to_float(metrics[key])
        if "tokens_per_second" in metrics:
            # The caller measures it (per log window): keep showing its latest value between
            # log steps instead of mixing in this class's own estimate.
            self._fields["tok/s"] = _to_float(metrics["tokens_per_second"])
            self._caller_rate = True
        elif self._tokens_per_step and not self._caller_rate:
            t0, s0 = self._first
            if step > s0 and now > t0:
                self._fields["tok/s"] = (step - s0) / (now - t0) * self._tokens_per_step

    def _postfix(self, separator: str) -> str:
        """`loss 3.142 | tok/s 12.3k | lr 3.00e-04`: fixed order, fixed formats."""
        formats = {"loss": "{:.4f}", "tok/s": None, "lr": "{:.2e}"}
        parts = []
        for name, fmt in formats.items():
            if name in self._fields:
                value = self._fields[name]
                parts.append(f"{name} {_si(value) if fmt is None else fmt.format(value)}")
        return separator.join(parts)

    def _line(self, step: int, now: float) -> str:
        """One plain progress line."""
        parts = [f"step {step}/{self._total}"]
        if self._fields:
            parts.append(self._postfix(" | "))
        t0, s0 = self._first
        rate = (step - s0) / (now - t0) if step > s0 and now > t0 else None
        parts.append(f"elapsed {_duration(now - t0)}")
        if rate is not None:
            parts.append(f"ETA {_duration((self._total - step) / rate)}")
        return " | ".join(parts)

    def _redirect_console_logging(self, stream: IO[str]) -> None:
        """Routes the console log handlers through `tqdm.write` while the bar is open."""
        consoles = {id(sys.stderr), id(sys.stdout), id(stream)}
        handlers = []
        for handler in logging.getLogger().handlers:
            # absl's handler writes through an inner StreamHandler.
            handlers.append(getattr(handler, "python_handler", handler))
        for handler in handlers:
            if isinstance(handler, logging.StreamHandler) and id(handler.stream) in consoles:
                original = handler.setStream(_TqdmStream(handler.stream))
                self._redirected.append((handler, original))

    def close(self) -> None:
        """Closes the bar and restores the log handlers (no-op in log mode)."""
        for handler, original in reversed(self._redirected):
            handler.setStream(original)
        self._redirected = []
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _TqdmStream:
    """A text stream whose lines go through `tqdm.write` (above any open bar)."""

    def __init__(self, stream: IO[str]):
        self._stream = stream

    def write(self, text: str) -> int:
        import tqdm

        if text.strip():
            tqdm.tqdm.write(text.rstrip("\n"), file=self._stream)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def _terminal_columns(stream: IO[str]) -> int:
    """Columns of the terminal behind `stream` (0 when unknown or unsized)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


def _si(value: float) -> str:
    """12345 -> "12.3k": three significant digits with an SI suffix."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:.3g}"


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
