"""`python -m engram_jax.train --config=configs/<name>.py --workdir=DIR`: the training program.

The host reads, tokenises, packs and hashes the data (Engram addresses depend only on tokens, so
the accelerator never hashes); one compiled `train_step` updates the dense parameters with AdamW
and the Engram tables with their own optimizer; orbax checkpoints keep the dense state, the memory
tables and the data-iterator position as separate items, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from etils import epath

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import config as config_lib
from engram_jax import data as data_lib
from engram_jax import memory_estimate, preemption, sharding, storage
from engram_jax.accounting import account, format_accounting
from engram_jax.hashing import tokenizer_fingerprint
from engram_jax.model import Transformer
from engram_jax.tables import host_tables

# The training program's parts, importable from here as before the split (tests, benches, tools).
from engram_jax.training.data_setup import (  # noqa: F401
    TOKENIZER_FILE,
    DataSetup,
    ShardedBatches,
    build_data,
    document_stream,
    make_batches,
    token_specs,
)
from engram_jax.training.loop import Program, run_loop
from engram_jax.training.processes import (  # noqa: F401
    ProcessMismatchError,
    check_processes_agree,
    run_on_process_zero,
)
from engram_jax.training.restore import (  # noqa: F401
    COMPUTE_ONLY_KEYS,
    TOKENIZER_MUST_MATCH,
    check_table_training,
    checkpoint_metadata,
    data_shards_to_resume,
    newest_readable_metadata,
    restore_or_init,
    with_resolved_pad,
)
from engram_jax.training.state import (  # noqa: F401
    TrainState,
    checkpoint_items,
    create_train_state,
    init_train_state,
    make_optimizers,
)
from engram_jax.training.steps import (  # noqa: F401
    evaluate,
    make_eval_step,
    make_mixing_diagnostics,
    make_train_step,
)
from engram_jax.workdir_lock import WorkdirLock

# The name benches and tests used before it became public.
_checkpoint_metadata = checkpoint_metadata

logger = logging.getLogger(__name__)


def _prepare_workdir(workdir: str) -> None:
    """Creates the workdir and proves it writable, so a bad path fails before any work."""
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"workdir: {workdir!r} is a file; expected a directory (or a path to create)"
        )
    probe = path / f".write_test_{socket.gethostname()}_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"workdir: cannot write to {workdir!r} ({type(e).__name__}: {e}); expected a "
            "writable directory"
        ) from e


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    step_hook: Callable[[int, TrainState], None] | None = None,
) -> dict[str, float]:
    """Trains (resuming from the workdir's latest checkpoint when there is one) and evaluates.

    Args:
      config: a config from `base_config()` (validated here).
      workdir: checkpoints, metrics, TensorBoard events and the tokenizer go here.
      step_hook: called as `step_hook(step, state)` after every step (and its checkpoint save,
        if any), e.g. for custom logging or fault-injection tests.

    Returns:
      The last step's training metrics merged with the last evaluation.

    Raises:
      preemption.TrainingStopped: SIGTERM or SIGINT (on any process) stopped training at a step
        boundary; that step was saved and the metrics flushed first. A second signal exits the
        process at once.
    """
    started = time.perf_counter()
    cfg = config_lib.validate(config)
    t = cfg.train
    if t.batch_size % jax.process_count():
        raise config_lib.ConfigError(
            f"config.batch_size: got {t.batch_size}; expected a multiple of the process count "
            f"{jax.process_count()}"
        )
    if cfg.mesh.axis_types != "auto":
        # The trainer places arrays by logical-axis rules and leaves the rest to XLA's sharding
        # propagation; Explicit axes would need an out_sharding on every reshape and gather of
        # the MoE dispatch. The Engram lookup itself (sharding.vocab_parallel_lookup) supports
        # Explicit meshes for custom training loops.
        raise config_lib.ConfigError(
            f"config.mesh.axis_types: got {cfg.mesh.axis_types!r}; the training program runs on "
            "'auto' meshes"
        )
    memory_estimate.check_train_step(cfg)  # a hopeless config fails before anything is written
    _prepare_workdir(workdir)
    mesh = sharding.mesh_from_config(cfg.mesh)
    batch_shards = sharding.batch_shards(mesh)
    if t.batch_size % batch_shards:
        raise config_lib.ConfigError(
            f"config.batch_size: got {t.batch_size}; expected a multiple of data x fsdp = "
            f"{batch_shards} devices"
        )
    row_shards = sharding.table_row_shards(mesh)
    if cfg.model.engram.enabled and cfg.model.engram.table_row_multiple % row_shards:
        raise config_lib.ConfigError(
            f"config.model.engram.table_row_multiple: got {cfg.model.engram.table_row_multiple}; "
            f"expected a multiple of the {row_shards} table-row shards (mesh fsdp x tensor)"
        )
    # One run per workdir: process 0 holds the lock for the whole job.
    lock = run_on_process_zero(lambda: _acquire_lock(workdir), "locking the workdir")
    try:
        return _train_locked(config, cfg, workdir, mesh, step_hook, started)
    finally:
        if lock is not None:
            lock.release()


def _acquire_lock(workdir: str) -> WorkdirLock:
    lock = WorkdirLock(workdir)
    lock.acquire()
    return lock


def _resume_check(
    config: ml_collections.ConfigDict, cfg: config_lib.Config, saved: dict[str, Any] | None
) -> Callable[[Any], None]:
    """`check(tokenizer)`: refuses a resume whose tokenizer, model or tables' optimizer do not
    match the checkpoint's metadata `saved` (a no-op without a checkpoint). `build_data` calls it
    before the tokenizer (or anything else) is written, so a refused resume changes nothing."""

    def check(tokenizer: Any) -> None:
        if saved is None:
            return
        full = config_lib.to_dict(config)
        model = full["model"]
        model["pad_id"] = data_lib.resolve_pad_id(tokenizer, cfg.model.pad_id, cfg.train.eos_token)
        current = {"model": model, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
        checkpoint_lib.check_compatible(
            with_resolved_pad(saved, model["pad_id"]),
            current,
            keys_must_match=TOKENIZER_MUST_MATCH,
            may_differ=COMPUTE_ONLY_KEYS,
        )
        check_table_training(saved, full)

    return check


@dataclasses.dataclass
class _Parts:
    """What the setup builds before the loop: data, model, optimizers and the initial state."""

    setup: DataSetup
    model: Transformer
    txs: tuple[Any, Any]
    schedule: Any
    state: TrainState
    shardings: Any
    host: host_tables.HostPlacement | None


def _build(
    config: ml_collections.ConfigDict,
    cfg: config_lib.Config,
    workdir: str,
    mesh: jax.sharding.Mesh,
    saved: dict | None,
) -> _Parts:
    """The data setup, the model and a fresh state (tables on the device or in host RAM)."""
    t = cfg.train
    setup = build_data(
        cfg,
        workdir,
        check_tokenizer=_resume_check(config, cfg, saved),
        checkpoint_tokenizer=saved.get("tokenizer_fingerprint") if saved else None,
    )
    setup.memory_shards = max(1, sharding.batch_shards(mesh) // jax.process_count())
    if t.eval_batches:
        # Fails now, not at the first evaluation, when this process's shard holds no
        # held-out document (the stream names the data and the process).
        next(iter(document_stream(setup, cfg, train=False)))
    else:
        logger.warning(
            "evaluation is disabled (eval_batches=0): no eval loss, bits per byte or mixing "
            "diagnostics will be written; set eval_batches > 0 to evaluate"
        )
    model = Transformer(cfg.model, lookup_fn=sharding.table_lookup_fn(mesh))
    dense_tx, memory_tx, schedule = make_optimizers(cfg)
    on_host = t.table_placement == "host" and bool(host_tables.row_sets(cfg.model))
    if on_host and jax.process_count() > 1:
        raise config_lib.ConfigError(
            f"config.table_placement: got 'host' with {jax.process_count()} processes; "
            "host tables are single-process (use table_placement='device' on multi-host runs)"
        )
    txs = (dense_tx, memory_tx)
    placement = "host" if on_host else "device"
    state, shardings = create_train_state(model, cfg, txs, mesh, table_placement=placement)
    host = None
    if on_host:
        host = host_tables.HostPlacement(
            model, cfg, state, shardings, dense_tx, memory_tx, schedule, mesh
        )
        state, shardings = host.state, host.shardings
    return _Parts(setup, model, txs, schedule, state, shardings, host)


def _compile_steps(
    parts: _Parts, cfg: config_lib.Config, mesh: jax.sharding.Mesh
) -> tuple[Callable, Callable, Callable | None]:
    """The jitted train step, eval step and mixing diagnostics (None without mixing); with host
    tables they read the batch's rows from host RAM (`host_tables.HostPlacement`)."""
    batch_sharding = sharding.batch_sharding(mesh)
    model, shardings, host = parts.model, parts.shardings, parts.host
    diagnostics = make_mixing_diagnostics(cfg, model.lookup_fn)
    if host is not None:
        # The eval and the diagnostics take the gathered rows as a third, batch-sharded input.
        with_rows = (shardings, batch_sharding, batch_sharding)
        eval_step = host.with_rows(jax.jit(make_eval_step(model), in_shardings=with_rows))
        if diagnostics is not None:
            diagnostics = host.with_rows(jax.jit(diagnostics, in_shardings=with_rows))
        return host.train_step, eval_step, diagnostics
    train_step = jax.jit(
        make_train_step(model, parts.txs, parts.schedule),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    eval_step = jax.jit(make_eval_step(model), in_shardings=(shardings, batch_sharding))
    if diagnostics is not None:
        diagnostics = jax.jit(diagnostics, in_shardings=(shardings, batch_sharding))
    return train_step, eval_step, diagnostics


def _train_locked(
    config: ml_collections.ConfigDict,
    cfg: config_lib.Config,
    workdir: str,
    mesh: jax.sharding.Mesh,
    step_hook: Callable[[int, TrainState], None] | None,
    started: float,
) -> dict[str, float]:
    t = cfg.train
    store = checkpoint_lib.CheckpointStore(
        storage.join(workdir, "checkpoints"), max_to_keep=t.max_to_keep
    )
    try:
        saved = newest_readable_metadata(store)
        parts = _build(config, cfg, workdir, mesh, saved)
        accounting = account(cfg.model, t.seq_len)
        logger.info("model:\n%s", format_accounting(accounting))
        data_shards = data_shards_to_resume(saved, cfg)
        metadata = checkpoint_metadata(config, parts.setup, data_shards)
        state, data_state = restore_or_init(
            store, metadata, parts.state, parts.shardings, parts.host
        )
        step = int(jax.device_get(state.step))
        if step >= t.num_train_steps:
            logger.info(
                "nothing to do: already at step %d (num_train_steps=%d) in %s; raise "
                "num_train_steps to train further",
                step,
                t.num_train_steps,
                workdir,
            )
            if parts.host is not None:
                parts.host.trainer.close()
            store.close()
            return {}
        train_iter = make_batches(parts.setup, cfg, train=True, data_shards=data_shards)
        if parts.host is not None:
            train_iter = parts.host.wrap_iterator(train_iter)
        if data_state is not None:
            train_iter.set_state(data_state)
    except BaseException:
        store.close()
        raise

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        train_step, eval_step, diagnostics = _compile_steps(parts, cfg, mesh)
        program = Program(
            cfg=cfg,
            mesh=mesh,
            setup=parts.setup,
            train_step=train_step,
            eval_step=eval_step,
            diagnostics=diagnostics,
            store=store,
            metadata=metadata,
            flops_per_token=accounting.flops_per_token,
            workdir=workdir,
            step_hook=step_hook,
            host=parts.host,
            started=started,
        )
        return run_loop(program, state, train_iter)


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    flags_values = flags.FLAGS
    config = flags_values.config
    config_lib.validate(config)
    multi = flags_values.num_processes > 1
    if flags_values.distributed or multi or config.mesh.coordinator_address:
        # With no address or counts, jax detects them itself (Cloud TPU pods, SLURM).
        jax.distributed.initialize(
            coordinator_address=config.mesh.coordinator_address or None,
            num_processes=flags_values.num_processes if multi else None,
            process_id=flags_values.process_id if multi else None,
            initialization_timeout=config.mesh.initialization_timeout,
        )
    # Orbax and absl log every checkpoint internal at INFO; keep the console to our own lines.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        train_and_evaluate(config, flags_values.workdir)
    except preemption.TrainingStopped as stopped:
        logger.warning("%s", stopped)
        sys.exit(stopped.exit_code)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file, or the name of a shipped config (tiny).", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize() even without a coordinator address or process count, "
        "letting jax detect them (Cloud TPU pods, SLURM); launch/tpu_pod.sh sets it.",
    )
    flags.DEFINE_integer("num_processes", 1, "Processes of a multi-process run (1: single).")
    flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from engram_jax import cli

    _define_flags()
    cli.run(main, config_flag="config")  # --config=tiny: a shipped config by name
