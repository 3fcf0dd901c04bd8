"""Checkpoints of a training run: the metadata that says what a checkpoint means, the checks that
a resume means the same thing, restoring the newest readable step (dense state, tables, data
position) and saving one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import config as config_lib
from engram_jax.tables import host_tables
from engram_jax.training.data_setup import DataSetup
from engram_jax.training.state import TrainState, checkpoint_items

logger = logging.getLogger(__name__)

# Checkpoint metadata entries that must match for a restore to mean the same thing.
MUST_MATCH = ("model", "tokenizer_fingerprint", "compressed_tokenizer_fingerprint", "hasher")


# Model keys that change how a step is computed but not what the parameters are: a resume may
# change them (the restore names each change). `scan_layers` is not one of them: it stacks the
# blocks' parameters into [L, ...] leaves, another tree. The mesh is not in the model config.
COMPUTE_ONLY_KEYS = (
    "model.dtype",
    "model.remat",
    "model.attention.implementation",
    # How tokens reach the experts, not what the experts are: the parameters are the same.
    "model.moe.dispatch",
    "model.moe.block_size",
    "model.moe.capacity_factor",
)


# What the tokenizer alone decides; checked before the workdir is written to.
TOKENIZER_MUST_MATCH = ("model", "tokenizer_fingerprint")


def checkpoint_metadata(
    config: ml_collections.ConfigDict, setup: DataSetup, data_shards: int | None = None
) -> dict[str, Any]:
    full = config_lib.to_dict(config)
    # The pad id as resolved (-1 names the tokenizer's), so a resume compares ids, not spellings.
    full["model"]["pad_id"] = setup.spec.pad_id
    # What decides the order and content of the batches: a saved iterator position means the same
    # thing only under the same values.
    data = {
        "seed": full["seed"],
        "batch_size": full["batch_size"],
        "seq_len": full["seq_len"],
        "data_shards": data_shards or jax.process_count(),
        "corpus_fingerprint": setup.corpus.fingerprint,
        "eval_fraction": full["eval_fraction"],
        "eval_data_path": full["eval_data_path"],
        "data_workers": full["data_workers"],
        "shuffle_window": full["shuffle_window"],
    }
    return {"config": full, "model": full["model"], "data": data, **setup.metadata()}


def newest_readable_metadata(store: checkpoint_lib.CheckpointStore) -> dict | None:
    """The metadata of the newest step whose `meta` item reads (None without checkpoints)."""
    for step in reversed(store.all_steps()):
        try:
            return store.read_metadata(step)
        except checkpoint_lib.CheckpointReadError as e:
            logger.warning("checkpoint step %d: metadata unreadable (%s)", step, e)
    return None


def restore_or_init(
    store: checkpoint_lib.CheckpointStore,
    current: dict[str, Any],
    state: TrainState,
    shardings: Any,
    host: host_tables.HostPlacement | None = None,
) -> tuple[TrainState, dict | None]:
    """Restores the newest step that restores (an unreadable newer one is set aside with a
    warning, never deleted), or returns `state` untouched when there is no checkpoint.
    `current` is this run's checkpoint metadata (`checkpoint_metadata`)."""
    steps = store.all_steps()
    failures: list[str] = []
    for step in reversed(steps):
        try:
            result = _restore_step(store, step, current, state, shardings, host)
        except checkpoint_lib.CheckpointReadError as e:
            logger.warning(
                "checkpoint step %d cannot be restored, skipping it (it is kept, moved out of "
                "the checkpoint directory) and trying the next older step: %s",
                step,
                e,
            )
            failures.append(f"step {step}: {e}")
            continue
        _agree_on_restored_step(step)
        for skipped in steps[len(steps) - len(failures) :]:
            where = store.set_aside(skipped)
            logger.warning("unreadable checkpoint step %d moved to %s", skipped, where)
        store.enforce_max_to_keep()
        return result
    if failures:
        raise checkpoint_lib.CheckpointReadError(
            f"no checkpoint in {store.directory} restores:\n  " + "\n  ".join(failures)
        )
    _agree_on_restored_step(0)
    return state, None


def _agree_on_restored_step(step: int) -> None:
    """Every process must resume from the same step (they read the same files, so a
    disagreement means a storage fault); raises naming the steps otherwise."""
    if jax.process_count() == 1:
        return
    steps = np.asarray(multihost_utils.process_allgather(np.int64(step))).reshape(-1)
    if len(set(steps.tolist())) > 1:
        raise checkpoint_lib.CheckpointReadError(
            f"processes restored different checkpoint steps {steps.tolist()} (process i at index "
            "i): some checkpoint files read differently on different hosts"
        )


def _check_resume(step: int, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuses a checkpoint that means something else (model, tokenizer, hashing, the tables'
    optimizer); names the compute-only settings a resume changes."""
    changed = checkpoint_lib.check_compatible(
        saved, current, keys_must_match=MUST_MATCH, may_differ=COMPUTE_ONLY_KEYS
    )
    check_table_training(saved, current["config"])
    if changed:
        logger.warning(
            "checkpoint step %d: resuming with changed compute settings (parameters "
            "unaffected):\n  %s",
            step,
            "\n  ".join(changed),
        )


def _same_data_settings(step: int, saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the saved data-iterator position means the same batches now; when not (new data,
    batch shape, seed or shard count) the model resumes and the data stream starts afresh."""
    saved_data = _saved_data_settings(saved)
    if saved_data == current["data"]:
        return True
    logger.warning(
        "checkpoint step %d: data settings differ (saved %s, now %s); restoring the model "
        "and starting the data stream from the beginning",
        step,
        saved_data,
        current["data"],
    )
    return False


def _restore_step(
    store: checkpoint_lib.CheckpointStore,
    step: int,
    current: dict[str, Any],
    state: TrainState,
    shardings: Any,
    host: host_tables.HostPlacement | None = None,
) -> tuple[TrainState, dict | None]:
    saved = with_resolved_pad(store.read_metadata(step), current["model"]["pad_id"])
    _check_resume(step, saved, current)

    def abstract(tree, tree_shardings):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, tree_shardings
        )

    dense, memory = checkpoint_items(state)
    dense_shardings, memory_shardings = checkpoint_items(shardings)
    same_data = _same_data_settings(step, saved, current)
    restored = store.restore(
        step,
        abstract_state=abstract(dense, dense_shardings),
        abstract_memory=(
            host.abstract_memory_item() if host else abstract(memory, memory_shardings)
        ),
        items=("state", "memory"),
    )
    if same_data:
        restored["data"] = _merge_shard_states(store.restore_all_data(step))
        logger.info(
            "checkpoint step %d: data stream position restored (shards %s)",
            step,
            ", ".join(sorted(restored["data"]["shards"], key=int)),
        )
    d, m = restored["state"], restored.get("memory") or {"tables": {}, "opt_state": ()}
    if host is not None:
        # Host tables: the memory item fills host RAM; the device state keeps no tables.
        host.tables.load_memory_item(m)
        m = {"tables": state.memory, "opt_state": state.memory_opt_state}
    logger.info("restored checkpoint step %d from %s", step, store.directory)
    new_state = TrainState(
        step=d["step"],
        params=d["params"],
        memory=m["tables"],
        opt_state=d["opt_state"],
        memory_opt_state=m["opt_state"] if m["tables"] else state.memory_opt_state,
        moe_bias=d["moe_bias"],
    )
    return new_state, restored.get("data")


def with_resolved_pad(saved: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """Checkpoint metadata with a `model.pad_id` of -1 ("the tokenizer's", as checkpoints of one
    earlier version wrote it) replaced by `pad_id`, the id it resolves to with this run's
    tokenizer (whose fingerprint must equal the checkpoint's)."""
    model = saved.get("model")
    if not isinstance(model, dict) or model.get("pad_id") != -1:
        return saved
    return {**saved, "model": {**model, "pad_id": pad_id}}


def _table_training(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide the structure of the tables' optimizer state in a checkpoint
    (none without Engram); a checkpoint written before `table_update` existed was trained with
    whole-table optax Adam (`config_lib.LEGACY_VALUES`)."""
    model = config.get("model", {})
    token_tables = any(model.get(k, {}).get("enabled") for k in ("overencoding", "ple"))
    hidden_addressed = bool(model.get("ultramem", {}).get("layer_ids"))
    if not model.get("engram", {}).get("layer_ids") and not token_tables and not hidden_addressed:
        return {}  # no Engram, OverEncoding, PLE or UltraMem table: no tables
    update = config.get("table_update", config_lib.LEGACY_VALUES["table_update"])
    settings = {"table_update": update}
    if update == "sparse":
        settings["table_optimizer"] = config.get("table_optimizer")
    return settings


def check_table_training(saved: dict[str, Any], config: Mapping[str, Any]) -> None:
    """Refuses a resume that changes how the tables are optimized: the checkpoint's optimizer
    state for them would not fit (raises naming each key and the override that resumes)."""
    before = _table_training(saved.get("config", {}))
    now = _table_training(config)
    changed = [key for key in before if before.get(key) != now.get(key)]
    if changed:
        raise checkpoint_lib.CheckpointMismatchError(
            "checkpoint is incompatible with the current config: the Engram tables' optimizer "
            "state was written for "
            + ", ".join(f"{key}={before[key]!r} (config {now.get(key)!r})" for key in changed)
            + "; resume with "
            + " ".join(f"--config.{key}={before[key]}" for key in changed)
        )


def _saved_data_settings(saved: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's data settings; those written before logical data shards existed name
    the process count, which was then the shard count."""
    data = saved.get("data")
    if isinstance(data, dict) and "process_count" in data and "data_shards" not in data:
        data = {**data, "data_shards": data["process_count"]}
        del data["process_count"]
    return data


def _merge_shard_states(per_process: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One `ShardedBatches` state from every saving process's; a plain iterator state (written
    before logical shards) is the shard of its process's index."""
    shards = {}
    for process, state in per_process.items():
        shards.update(state["shards"] if "shards" in state else {str(process): state})
    return {"shards": shards}


def data_shards_to_resume(saved: dict[str, Any] | None, cfg: config_lib.Config) -> int:
    """The run's logical data-shard count: the checkpoint's when this process count can split it
    (and the batch size still divides it), else this run's process count."""
    count = jax.process_count()
    shards = (_saved_data_settings(saved) or {}).get("data_shards") if saved else None
    if not isinstance(shards, int) or shards == count:
        return count
    if shards % count == 0 and cfg.train.batch_size % shards == 0:
        logger.info(
            "resuming a data stream of %d shards on %d processes (%d shards each)",
            shards,
            count,
            shards // count,
        )
        return shards
    logger.warning(
        "the checkpoint's data stream has %d shards, which %d processes cannot split evenly (or "
        "batch_size %d does not divide); the data stream starts afresh",
        shards,
        count,
        cfg.train.batch_size,
    )
    return count


def save_checkpoint(
    store, state: TrainState, data_iter, metadata: dict[str, Any], host=None
) -> None:
    step = int(jax.device_get(state.step))
    dense, memory = checkpoint_items(state)
    if host is not None:
        memory = host.memory_item()
    store.save(
        step,
        state=dense,
        memory=memory,
        data_state=data_iter.get_state(),
        metadata=metadata,
    )
