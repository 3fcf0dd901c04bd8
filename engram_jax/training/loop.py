"""The training loop: steps until `num_train_steps`, evaluating, logging, plotting and
checkpointing on schedule, and closing every service in order when it ends or fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from engram_jax import (
    preemption,
    profiling,
    sharding,
)
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


def run_loop(program: Program, state: TrainState, train_iter) -> dict[str, float]:
    """Steps until `num_train_steps`, evaluating, logging and checkpointing on schedule."""
    cfg, mesh, store = program.cfg, program.mesh, program.store
    t = cfg.train
    step = int(jax.device_get(state.step))
    tokens_per_step = t.batch_size * t.seq_len
    peak_flops = metrics_lib.peak_flops_per_second() * jax.device_count()
    # Rows past the restored step were written by a killed run; this run writes them again.
    writer = metrics_lib.MetricsWriter(program.workdir, resume_step=step)
    progress = metrics_lib.Progress(
        t.num_train_steps, initial_step=step, log_every=t.log_every, tokens_per_step=tokens_per_step
    )
    plots = plot_lib.PlotRefresher(program.workdir, enabled=writer.enabled)
    profiler = profiling.StepProfiler(program.workdir, t.profile_steps, jax.process_index())
    pending: tuple[int, dict[str, jax.Array]] | None = None
    last: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0

    def flush_pending() -> None:
        nonlocal pending, last, window_start, window_steps
        if pending is None:
            return
        pending_step, device_metrics = pending
        pending = None
        metrics = host_metrics(pending_step, device_metrics)
        window_steps += 1
        if pending_step % t.log_every == 0 or pending_step == t.num_train_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_second = window_steps * tokens_per_step / max(elapsed, 1e-9)
            metrics["tokens_per_second"] = tokens_per_second
            metrics["mfu"] = tokens_per_second * program.flops_per_token / peak_flops
            window_start, window_steps = time.perf_counter(), 0
            writer.write(pending_step, metrics)
        progress.update(pending_step, metrics)
        last.update(metrics)

    def run_eval() -> None:
        eval_iter = make_batches(program.setup, cfg, train=False)
        batches = [sharding.global_batch(next(eval_iter), mesh) for _ in range(t.eval_batches)]
        eval_metrics = evaluate(program.eval_step, state, iter(batches))
        if program.diagnostics is not None:
            diagnostics = jax.device_get(program.diagnostics(state, batches[0]))
            eval_metrics.update({k: float(v) for k, v in diagnostics.items()})
        writer.write(step, eval_metrics)
        progress.log_eval(step, eval_metrics)
        last.update(eval_metrics)
        writer.flush()  # the plots read metrics.jsonl
        plots.refresh()

    def close_all() -> None:
        # Every closer runs even if an earlier one raises (waiting for the last checkpoint
        # first); the first error is re-raised after all have run.
        with contextlib.ExitStack() as closers:
            if program.host is not None:
                closers.callback(program.host.trainer.close)
            closers.callback(progress.close)
            closers.callback(plots.close)  # runs after writer.close (LIFO): every row is on disk
            closers.callback(writer.close)
            closers.callback(store.close)
            closers.callback(store.wait_until_finished)
            closers.callback(profiler.close)

    stop = preemption.StopSignals(
        mesh, t.batch_size // jax.process_count(), sharding.BATCH_AXES
    ).install()
    try:
        while step < t.num_train_steps:
            batch = sharding.global_batch(next(train_iter), mesh)
            profiler.before_step(step + 1)
            state, device_metrics = program.train_step(state, batch)
            profiler.after_step(step + 1, (state, device_metrics))
            if pending is None and window_steps == 0:
                # The first call compiled the step; throughput counts from here.
                window_start = time.perf_counter()
            step += 1
            # Fetch the previous step's metrics only now, so the device never waits for the host.
            flush_pending()
            pending = (step, device_metrics)
            save_now = step == t.num_train_steps or (
                t.checkpoint_every and step % t.checkpoint_every == 0
            )
            eval_now = step == t.num_train_steps or (t.eval_every and step % t.eval_every == 0)
            if save_now or eval_now:
                flush_pending()
            if eval_now and t.eval_batches:
                run_eval()
            if save_now:
                save_checkpoint(store, state, train_iter, program.metadata, program.host)
            if save_now or eval_now:
                # Evaluation and checkpoint time are not training throughput.
                window_start, window_steps = time.perf_counter(), 0
            if program.step_hook is not None:
                program.step_hook(step, state)
            if stop.should_stop(step):
                if not save_now:
                    flush_pending()
                    save_checkpoint(store, state, train_iter, program.metadata, program.host)
                break
        flush_pending()
    except BaseException:
        # The loop's own error is the one to report; a failure while closing is only logged.
        try:
            close_all()
        except Exception:
            logger.exception("error while closing after a failed training loop")
        finally:
            stop.uninstall()
        raise
    try:
        close_all()
    finally:
        stop.uninstall()
    if stop.agreed:
        raise preemption.TrainingStopped(
            stop.agreed, step, str(store.directory / str(step)), local=stop.local
        )
    return last


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
