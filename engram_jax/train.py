"""`python -m engram_jax.train --config=configs/<name>.py --workdir=DIR`: the training program.

The host reads, tokenises, packs and hashes the data (Engram addresses depend only on tokens, so
the accelerator never hashes); one compiled `train_step` updates the dense parameters with AdamW
and the Engram tables with their own optimizer; orbax checkpoints keep the dense state, the memory
tables and the data-iterator position as separate items, so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
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
        return _train_locked(config, cfg, workdir, mesh, step_hook)
    finally:
        if lock is not None:
            lock.release()


def _acquire_lock(workdir: str) -> WorkdirLock:
    lock = WorkdirLock(workdir)
    lock.acquire()
    return lock


def _train_locked(
    config: ml_collections.ConfigDict,
    cfg: config_lib.Config,
    workdir: str,
    mesh: jax.sharding.Mesh,
    step_hook: Callable[[int, TrainState], None] | None,
) -> dict[str, float]:
    t = cfg.train
    store = checkpoint_lib.CheckpointStore(
        storage.join(workdir, "checkpoints"), max_to_keep=t.max_to_keep
    )
    try:
        saved = newest_readable_metadata(store)

        def check_tokenizer(tokenizer: Any) -> None:
            # A refused resume must leave the workdir as it was: this runs before the tokenizer
            # (or anything else) is written.
            if saved is not None:
                full = config_lib.to_dict(config)
                model = full["model"]
                model["pad_id"] = data_lib.resolve_pad_id(
                    tokenizer, cfg.model.pad_id, cfg.train.eos_token
                )
                current = {
                    "model": model,
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                }
                checkpoint_lib.check_compatible(
                    with_resolved_pad(saved, model["pad_id"]),
                    current,
                    keys_must_match=TOKENIZER_MUST_MATCH,
                    may_differ=COMPUTE_ONLY_KEYS,
                )
                check_table_training(saved, full)

        setup = build_data(
            cfg,
            workdir,
            check_tokenizer=check_tokenizer,
            checkpoint_tokenizer=saved.get("tokenizer_fingerprint") if saved else None,
        )
        batch_shards = sharding.batch_shards(mesh)
        setup.memory_shards = max(1, batch_shards // jax.process_count())
        if cfg.train.eval_batches:
            # Fails now, not at the first evaluation, when this process's shard holds no
            # held-out document (the stream names the data and the process).
            next(iter(document_stream(setup, cfg, train=False)))
        model = Transformer(cfg.model, lookup_fn=sharding.table_lookup_fn(mesh))
        accounting = account(cfg.model, t.seq_len)
        logger.info("model:\n%s", format_accounting(accounting))

        dense_tx, memory_tx, schedule = make_optimizers(cfg)
        on_host = t.table_placement == "host" and cfg.model.engram.enabled
        if on_host and jax.process_count() > 1:
            raise config_lib.ConfigError(
                f"config.table_placement: got 'host' with {jax.process_count()} processes; "
                "host tables are single-process (use table_placement='device' on multi-host runs)"
            )
        state, shardings = create_train_state(
            model,
            cfg,
            (dense_tx, memory_tx),
            mesh,
            table_placement="host" if on_host else "device",
        )
        host = None
        if on_host:
            host = host_tables.HostPlacement(
                model, cfg, state, shardings, dense_tx, memory_tx, schedule, mesh
            )
            state, shardings = host.state, host.shardings
        data_shards = data_shards_to_resume(saved, cfg)
        metadata = checkpoint_metadata(config, setup, data_shards)
        state, data_state = restore_or_init(store, metadata, state, shardings, host)
        train_iter = make_batches(setup, cfg, train=True, data_shards=data_shards)
        if host is not None:
            train_iter = host.wrap_iterator(train_iter)
        if data_state is not None:
            train_iter.set_state(data_state)
    except BaseException:
        store.close()
        raise

    batch_sharding = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        train_step = jax.jit(
            make_train_step(model, (dense_tx, memory_tx), schedule),
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        eval_step = jax.jit(make_eval_step(model), in_shardings=(shardings, batch_sharding))
        diagnostics = make_mixing_diagnostics(cfg, model.lookup_fn)
        if diagnostics is not None:
            diagnostics = jax.jit(diagnostics, in_shardings=(shardings, batch_sharding))
        if host is not None:
            # Host tables: steps and evals read rows from host RAM (host_tables.HostPlacement);
            # the mHC diagnostics need tables on the device and are skipped.
            train_step, eval_step, diagnostics = host.train_step, host.eval_step, None
        program = Program(
            cfg=cfg,
            mesh=mesh,
            setup=setup,
            train_step=train_step,
            eval_step=eval_step,
            diagnostics=diagnostics,
            store=store,
            metadata=metadata,
            flops_per_token=accounting.flops_per_token,
            workdir=workdir,
            step_hook=step_hook,
            host=host,
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
