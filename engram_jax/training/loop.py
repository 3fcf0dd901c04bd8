"""The training loop: steps until `num_train_steps`, evaluating, logging, plotting and
checkpointing on schedule, and closing every service in order when it ends or fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import jax

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import config as config_lib
from engram_jax import metrics as metrics_lib
from engram_jax import plot as plot_lib
from engram_jax import preemption, profiling, sharding, storage
from engram_jax.tables import host_tables
from engram_jax.training.data_setup import DataSetup, make_batches
from engram_jax.training.restore import save_checkpoint
from engram_jax.training.state import TrainState
from engram_jax.training.steps import evaluate

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Program:
    """The compiled steps and the services the training loop drives."""

    cfg: config_lib.Config
    mesh: jax.sharding.Mesh
    setup: DataSetup
    train_step: Callable
    eval_step: Callable
    diagnostics: Callable | None
    store: checkpoint_lib.CheckpointStore
    metadata: dict[str, Any]
    flops_per_token: float
    workdir: str
    step_hook: Callable[[int, TrainState], None] | None
    host: host_tables.HostPlacement | None = None
    # When the run started (`time.perf_counter()`), for the closing summary's wall time.
    started: float = dataclasses.field(default_factory=time.perf_counter)


class _Services:
    """What the loop writes to while it steps: metrics (jsonl, TensorBoard), the progress lines,
    the plots and the profiler; `close` closes them and the checkpoint store in order."""

    def __init__(self, program: Program, step: int):
        t = program.cfg.train
        self.program = program
        self.tokens_per_step = t.batch_size * t.seq_len
        self.peak_flops = metrics_lib.peak_flops_per_second() * jax.device_count()
        # Rows past the restored step were written by a killed run; this run writes them again.
        self.writer = metrics_lib.MetricsWriter(program.workdir, resume_step=step)
        self.progress = metrics_lib.Progress(
            t.num_train_steps,
            initial_step=step,
            log_every=t.log_every,
            tokens_per_step=self.tokens_per_step,
        )
        self.plots = plot_lib.PlotRefresher(program.workdir, enabled=self.writer.enabled)
        self.profiler = profiling.StepProfiler(
            program.workdir, t.profile_steps, jax.process_index()
        )
        self.pending: tuple[int, dict[str, jax.Array]] | None = None
        self.last: dict[str, float] = {}
        self.evaluated = False  # the first evaluation compiles the eval step (and diagnostics)
        self.window_start, self.window_steps = time.perf_counter(), 0

    def restart_window(self) -> None:
        """Throughput counts from now (compilation, evaluation and checkpoints are not training)."""
        self.window_start, self.window_steps = time.perf_counter(), 0

    def flush_pending(self) -> None:
        """Fetches the pending step's metrics and writes and shows them."""
        if self.pending is None:
            return
        t = self.program.cfg.train
        pending_step, device_metrics = self.pending
        self.pending = None
        metrics = host_metrics(pending_step, device_metrics)
        self.window_steps += 1
        if pending_step % t.log_every == 0 or pending_step == t.num_train_steps:
            elapsed = time.perf_counter() - self.window_start
            tokens_per_second = self.window_steps * self.tokens_per_step / max(elapsed, 1e-9)
            metrics["tokens_per_second"] = tokens_per_second
            metrics["mfu"] = tokens_per_second * self.program.flops_per_token / self.peak_flops
            self.restart_window()
            self.writer.write(pending_step, metrics)
        self.progress.update(pending_step, metrics)
        self.last.update(metrics)

    def run_eval(self, step: int, state: TrainState) -> None:
        """Evaluates `state` on `eval_batches` held-out batches (and the mixing diagnostics on
        the first), writes and shows the result and redraws the plots."""
        program, t = self.program, self.program.cfg.train
        eval_iter = make_batches(program.setup, program.cfg, train=False)
        batches = [
            sharding.global_batch(next(eval_iter), program.mesh) for _ in range(t.eval_batches)
        ]
        first = not self.evaluated
        if first:
            logger.info("compiling the evaluation step (step %d) ...", step)
            start = time.perf_counter()
        eval_metrics = evaluate(program.eval_step, state, iter(batches))
        if program.diagnostics is not None:
            diagnostics = jax.device_get(program.diagnostics(state, batches[0]))
            eval_metrics.update({k: float(v) for k, v in diagnostics.items()})
        if first:
            self.evaluated = True
            logger.info(
                "compiled the evaluation step and evaluated step %d in %.1f s",
                step,
                time.perf_counter() - start,
            )
        self.writer.write(step, eval_metrics)
        self.progress.log_eval(step, eval_metrics)
        self.last.update(eval_metrics)
        self.writer.flush()  # the plots read metrics.jsonl
        self.plots.refresh()

    def close(self) -> None:
        """Every closer runs even if an earlier one raises (waiting for the last checkpoint
        first); the first error is re-raised after all have run."""
        with contextlib.ExitStack() as closers:
            if self.program.host is not None:
                closers.callback(self.program.host.trainer.close)
            closers.callback(self.progress.close)
            # Runs after writer.close (LIFO): every row is on disk.
            closers.callback(self.plots.close)
            closers.callback(self.writer.close)
            closers.callback(self.program.store.close)
            closers.callback(self.program.store.wait_until_finished)
            closers.callback(self.profiler.close)


def _first_step(program: Program, state: TrainState, batch: Any, step: int) -> tuple[Any, Any]:
    """The first step of this run, which compiles the step: one line before, one with its time
    (waiting for it once, so the time is the compilation's and the step's, not a dispatch's)."""
    logger.info("compiling the training step (step %d) ...", step + 1)
    start = time.perf_counter()
    state, device_metrics = program.train_step(state, batch)
    jax.block_until_ready(device_metrics)
    logger.info(
        "compiled the training step and ran step %d in %.1f s",
        step + 1,
        time.perf_counter() - start,
    )
    return state, device_metrics


def run_loop(program: Program, state: TrainState, train_iter) -> dict[str, float]:
    """Steps until `num_train_steps`, evaluating, logging and checkpointing on schedule."""
    cfg, mesh, store = program.cfg, program.mesh, program.store
    t = cfg.train
    step = int(jax.device_get(state.step))
    run = _Services(program, step)
    first_step = step
    stop = preemption.StopSignals(
        mesh, t.batch_size // jax.process_count(), sharding.BATCH_AXES
    ).install()
    try:
        while step < t.num_train_steps:
            batch = sharding.global_batch(next(train_iter), mesh)
            run.profiler.before_step(step + 1)
            if step == first_step:
                state, device_metrics = _first_step(program, state, batch, step)
                run.restart_window()  # throughput and ETA count from the compiled step on
            else:
                state, device_metrics = program.train_step(state, batch)
            run.profiler.after_step(step + 1, (state, device_metrics))
            step += 1
            # Fetch the previous step's metrics only now, so the device never waits for the host.
            run.flush_pending()
            run.pending = (step, device_metrics)
            if _after_step(program, run, step, state, train_iter, stop):
                break
        run.flush_pending()
    except BaseException:
        # The loop's own error is the one to report; a failure while closing is only logged.
        try:
            run.close()
        except Exception:
            logger.exception("error while closing after a failed training loop")
        finally:
            stop.uninstall()
        raise
    try:
        run.close()
    finally:
        stop.uninstall()
    if stop.agreed:
        raise preemption.TrainingStopped(
            stop.agreed, step, str(store.directory / str(step)), local=stop.local
        )
    log_summary(program, step, run.last)
    return run.last


def _after_step(
    program: Program,
    run: _Services,
    step: int,
    state: TrainState,
    train_iter: Any,
    stop: preemption.StopSignals,
) -> bool:
    """Evaluates, checkpoints and calls the step hook on schedule after `step`; True when a
    stop signal ends the run here (the step is saved first)."""
    t = program.cfg.train
    save_now = step == t.num_train_steps or bool(
        t.checkpoint_every and step % t.checkpoint_every == 0
    )
    eval_now = step == t.num_train_steps or bool(t.eval_every and step % t.eval_every == 0)
    if save_now or eval_now:
        run.flush_pending()
    if eval_now and t.eval_batches:
        run.run_eval(step, state)
    if save_now:
        save_checkpoint(program.store, state, train_iter, program.metadata, program.host)
    if save_now or eval_now:
        # Evaluation and checkpoint time are not training throughput.
        run.restart_window()
    if program.step_hook is not None:
        program.step_hook(step, state)
    if stop.should_stop(step):
        if not save_now:
            run.flush_pending()
            save_checkpoint(program.store, state, train_iter, program.metadata, program.host)
        return True
    return False


def log_summary(program: Program, step: int, last: dict[str, float]) -> None:
    """The lines that close a run: where it ended, its last losses and wall time, where its
    outputs are and how to sample from it (process 0 only)."""
    if jax.process_index() != 0:
        return
    workdir = program.workdir
    wall = datetime.timedelta(seconds=round(time.perf_counter() - program.started))
    values = [f"step {step}", f"wall time {wall}"]
    for key, name in (
        ("train_loss", "train loss"),
        ("eval_loss", "eval loss"),
        ("eval_bits_per_byte", "eval bits/byte"),
    ):
        if key in last:
            values.append(f"{name} {last[key]:.4f}")
    logger.info(
        "training finished: %s\n"
        "  checkpoints: %s\n"
        "  metrics and plots: %s, %s\n"
        "  TensorBoard: tensorboard --logdir %s\n"
        '  generate: python -m engram_jax.generate --workdir=%s --prompt="..." --max_tokens=40',
        " | ".join(values),
        program.store.directory,
        storage.join(workdir, metrics_lib.METRICS_FILENAME),
        storage.join(workdir, plot_lib.PLOTS_DIRNAME),
        storage.join(workdir, metrics_lib.TENSORBOARD_DIRNAME),
        workdir,
    )


def host_metrics(step: int, device_metrics: dict[str, jax.Array]) -> dict[str, float]:
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    # A finite loss with non-finite gradients still leaves NaN parameters behind it.
    for key in ("train_loss", "grad_norm", "memory_grad_norm"):
        if not math.isfinite(metrics[key]):
            raise FloatingPointError(
                f"{key} is {metrics[key]} at step {step}; stopping before any checkpoint of "
                "this state is written"
            )
    return metrics
