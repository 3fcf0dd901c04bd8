"""Checkpoints: one orbax `CheckpointManager` with items `state`, `memory`, `data` and `meta`, async
saves, restores onto any mesh through abstract targets, and a config-compatibility check.

Layout of `<directory>/<step>/` (orbax writes `<step>.orbax-checkpoint-tmp` and renames it when
every item has committed, so a step directory is either complete or absent):

- `state/`: the dense pytree (params without tables, optimizer state, step, MoE bias, ...), orbax
  `StandardCheckpointHandler` (tensorstore/OCDBT, sharded, any dtype).
- `memory/`: the Engram tables and their optimizer state, written and read in row blocks by
  `memory_item.MemoryHandler` (bounded memory; orbax's standard layout of older checkpoints
  still restores); omitted when the tree has no leaves and restored as `{}`.
- `data/process_<i>-of-<n>.json`: each process's input-iterator state, the same file layout as
  `grain.checkpoint.CheckpointHandler` but taking a JSON dict instead of a live iterator.
- `meta/metadata`: JSON, the caller's metadata plus a reserved `"_checkpoint"` entry
  (`process_count`, `items`, `step`, `format_version`), written by process 0.

The directory may be a local path or a URL (`gs://...`: orbax writes through tensorstore and
epath). Steps that do not restore are moved aside (`set_aside`), never deleted; `max_to_keep` is
applied to steps left by a killed run with `enforce_max_to_keep`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from engram_jax.tables import memory_item

logger = logging.getLogger(__name__)

ITEMS = ("state", "memory", "data", "meta")
RESERVED_META_KEY = "_checkpoint"
FORMAT_VERSION = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the current run (config, fingerprints or process count)."""


class CheckpointReadError(RuntimeError):
    """An item of a committed checkpoint could not be read (corrupt files, target mismatch)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint save failed, possibly in the background after `save` had returned."""


# --------------------------------------------------------------------------------------------------
# Per-process JSON item (iterator state)
# --------------------------------------------------------------------------------------------------


class _ProcessJsonHandler(ocp.CheckpointHandler):
    """Saves one JSON dict per process as `process_<i>-of-<n>.json` (grain's checkpoint layout)."""

    def save(self, directory: epath.Path, args: _DataSave) -> None:
        index, count = jax.process_index(), jax.process_count()
        (directory / f"process_{index}-of-{count}.json").write_text(json.dumps(args.item, indent=1))

    def restore(self, directory: epath.Path, args: _DataRestore | None = None) -> dict[str, Any]:
        if args is not None and args.all_processes:
            states = {}
            for path in directory.iterdir():
                match = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", path.name)
                if match:
                    states[int(match.group(1))] = json.loads(path.read_text())
            return states
        index, count = jax.process_index(), jax.process_count()
        path = directory / f"process_{index}-of-{count}.json"
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise FileNotFoundError(
                f"{path} does not exist (this is process {index} of {count}); found {found}"
            )
        return json.loads(path.read_text())


@ocp.args.register_with_handler(_ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    """Save args of the per-process JSON item."""

    item: Mapping[str, Any]


@ocp.args.register_with_handler(_ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    """Restore args of the per-process JSON item: this process's state, or with `all_processes`
    every saved process's, as {process index: state}."""

    all_processes: bool = False


# --------------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------------


class CheckpointStore:
    """Async orbax checkpoints of a training run in one directory.

    Saves are asynchronous: `save` returns once device arrays are copied to host memory, a
    background thread writes and commits them. Errors of that thread are raised as
    `CheckpointWriteError` at the latest by the next `save`, `wait_until_finished`, `restore`,
    `latest_step`, `all_steps` or `close` (orbax stores the exception and re-raises it on join).
    Old checkpoints beyond `max_to_keep` are deleted only after the new one has committed (orbax
    deletes them in its finalize thread, after the commit rename). A directory left by a killed
    save (`<step>.orbax-checkpoint-tmp`) is never listed as a step and, with
    `cleanup_partial=True`, is deleted when the store opens: only one process group may write to a
    directory at a time.

    Args:
      directory: checkpoint root (local path or any `epath` URL, e.g. `gs://...`).
      max_to_keep: keep the newest N committed checkpoints; None keeps all.
      async_save: write in a background thread (True) or block in `save` (False).
      create: create `directory` if missing; with False a missing directory raises
        FileNotFoundError (use it in read-only tools).
      cleanup_partial: delete unfinished `*.orbax-checkpoint-tmp` directories when opening.
      async_timeout_s: deadline of a background save (writes and, multi-process, the commit
        barrier); past it the save fails with `CheckpointWriteError` instead of hanging. Rounded
        up to whole seconds when there are several processes.
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        create: bool = True,
        cleanup_partial: bool = True,
        async_timeout_s: float = 1200.0,
    ):
        self._directory = epath.Path(directory)
        if not create and not self._directory.exists():
            raise FileNotFoundError(f"checkpoint directory {self._directory} does not exist")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"CheckpointStore: max_to_keep={max_to_keep}; expected >= 1 or None")
        if not async_timeout_s > 0:
            raise ValueError(f"CheckpointStore: async_timeout_s={async_timeout_s}; expected > 0")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=create,
            cleanup_tmp_directories=cleanup_partial,
            enable_async_checkpointing=async_save,
            # Multi-process barriers take whole seconds (jax's client rejects a float timeout).
            async_options=ocp.AsyncOptions(
                timeout_secs=async_timeout_s
                if jax.process_count() == 1
                else math.ceil(async_timeout_s)
            ),
        )
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "memory": memory_item.MemoryHandler(),
                "data": _ProcessJsonHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._pending_step: int | None = None
        self._max_to_keep = max_to_keep

    @property
    def directory(self) -> epath.Path:
        """The checkpoint root."""
        return self._directory

    def _step_path(self, step: int) -> epath.Path:
        """Final directory of a step (orbax's default step naming: the bare number)."""
        return self._directory / str(step)

    # ---------------------------------------------------------------------------------- saving

    def save(
        self,
        step: int,
        *,
        state: Any,
        memory: Any,
        data_state: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any],
    ) -> None:
        """Starts an asynchronous save of one step.

        Arrays may be sharded `jax.Array`s (each process writes its shards) or numpy arrays; the
        caller may donate or overwrite them as soon as `save` returns. The `memory` item is written
        before `save` returns, in row blocks straight from the live arrays (no host copy of the
        tables); the rest is written in the background. Saving a step that already exists raises:
        a good checkpoint is never overwritten.

        Args:
          step: training step, >= 0.
          state: dense pytree (params without tables, optimizer state, step, ...).
          memory: Engram tables and their optimizer state; a tree without leaves is not written.
          data_state: this process's JSON-serialisable input-iterator state, or None.
          metadata: JSON-serialisable dict (config, fingerprints, ...); the key "_checkpoint" is
            reserved.

        Raises:
          FileExistsError: `step` is already saved.
          TypeError: `metadata` or `data_state` is not JSON-serialisable.
          CheckpointWriteError: this save, or a previous asynchronous one, failed.
        """
        step = _check_step(step, "save")
        self.wait_until_finished()  # attributes an earlier async failure to its own step
        # Also look on disk: orbax's own check uses the manager's cached step list, and for a step
        # missing from it orbax REMOVES an existing directory before writing (its `force` path),
        # e.g. a step committed by another store opened on the same directory.
        if step in self._manager.all_steps() or self._step_path(step).exists():
            raise FileExistsError(
                f"checkpoint step {step} already exists at {self._step_path(step)}; refusing to "
                "overwrite a committed checkpoint"
            )
        if RESERVED_META_KEY in metadata:
            raise ValueError(f"save: metadata key {RESERVED_META_KEY!r} is reserved")
        items: dict[str, ocp.args.CheckpointArgs] = {"state": ocp.args.StandardSave(state)}
        if jax.tree.leaves(memory):
            # Written synchronously in row blocks from the live arrays: no host snapshot.
            items["memory"] = memory_item.MemorySave(memory)
        if data_state is not None:
            _check_json(data_state, "data_state", step)
            items["data"] = _DataSave(dict(data_state))
        meta = dict(metadata)
        meta[RESERVED_META_KEY] = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "process_count": jax.process_count(),
            "items": sorted([*items, "meta"], key=ITEMS.index),
        }
        _check_json(meta, "metadata", step)
        items["meta"] = ocp.args.JsonSave(meta)
        try:
            # force=True: the trainer decides when to save; orbax's save-decision policy would
            # otherwise skip steps silently (e.g. while a previous save is in flight).
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise CheckpointWriteError(
                f"saving checkpoint step {step} to {self._step_path(step)} failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        if not saved:
            raise CheckpointWriteError(f"orbax skipped saving checkpoint step {step}")
        self._pending_step = step
        logger.info("checkpoint step %d: save started (%s)", step, ", ".join(items))

    def wait_until_finished(self) -> None:
        """Blocks until the in-flight save (if any) has committed.

        Raises:
          CheckpointWriteError: the in-flight save failed; the step was not committed and no older
            checkpoint was deleted for it.
        """
        pending, self._pending_step = self._pending_step, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            # orbax dropped steps beyond max_to_keep from its cached list when the save started
            # (their deletion waits for the commit, which never came): re-read the directory.
            self._manager.reload()
            where = (
                f"step {pending} at {self._step_path(pending)}"
                if pending is not None
                else f"{self._directory}"
            )
            raise CheckpointWriteError(
                f"asynchronous checkpoint save of {where} failed: {type(e).__name__}: {e}"
            ) from e
        if pending is not None:
            logger.info("checkpoint step %d committed", pending)

    def enforce_max_to_keep(self) -> list[int]:
        """Deletes the oldest committed steps beyond `max_to_keep` and returns them.

        Orbax applies `max_to_keep` only when it saves, so steps left by a killed run (which saved
        its newest step and died before deleting the oldest) would otherwise stay for good. Call it
        on every process (orbax's delete is collective) after a successful restore, never before:
        the newest steps may be unreadable and the older ones the only good copies.
        """
        steps = self.all_steps()
        if self._max_to_keep is None or len(steps) <= self._max_to_keep:
            return []
        extra = steps[: len(steps) - self._max_to_keep]
        for step in extra:
            self._manager.delete(step)
        logger.info("deleted checkpoint steps %s beyond max_to_keep=%d", extra, self._max_to_keep)
        return extra

    def set_aside(self, step: int) -> epath.Path:
        """Moves an unreadable step out of the store, never deleting it, and returns where.

        It goes to `<directory>.unreadable-<step>` beside the store (`-1`, `-2`, ... appended when
        that exists; a sibling, because object stores have no empty folders to move into), so the
        store no longer lists it and a new checkpoint of the same step can be written. Process 0
        moves it; every process must call this (they wait for the move and re-list the steps).
        """
        step = _check_step(step, "set_aside")
        self.wait_until_finished()
        source = self._step_path(step)
        name = f"{self._directory.name}.unreadable-{step}"
        target = self._directory.parent / name
        suffix = 0
        while target.exists():
            suffix += 1
            target = self._directory.parent / f"{name}-{suffix}"
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self._manager.reload()
        return target

    def close(self) -> None:
        """Waits for the in-flight save, then releases orbax's threads. Raises like `wait`."""
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- reading

    def all_steps(self) -> list[int]:
        """Committed steps, ascending; waits for an in-flight save first."""
        self.wait_until_finished()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Newest committed step, or None; waits for an in-flight save first."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _resolve_step(self, step: int | None, what: str) -> int:
        """`step`, or the latest; FileNotFoundError naming the path when it does not exist."""
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"{what}: no committed checkpoint in {self._directory}")
            return steps[-1]
        step = _check_step(step, what)
        if step not in steps:
            raise FileNotFoundError(
                f"{what}: checkpoint step {step} not found at {self._step_path(step)}; "
                f"committed steps in {self._directory}: {steps}"
            )
        return step

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The `meta` item of `step` (default latest): the caller's metadata plus "_checkpoint".

        Raises:
          FileNotFoundError: no such step.
          CheckpointReadError: the item is unreadable.
        """
        step = self._resolve_step(step, "read_metadata")
        return self._restore_item(step, "meta", ocp.args.JsonRestore())

    def restore(
        self,
        step: int | None = None,
        *,
        abstract_state: Any = None,
        abstract_memory: Any = None,
        items: Sequence[str] = ITEMS,
    ) -> dict[str, Any]:
        """Restores some items of a committed step (default: the latest).

        Targets are abstract: pytrees of `jax.ShapeDtypeStruct` carrying the CURRENT shardings (e.g.
        `jax.eval_shape(init)` with `sharding=` from the current mesh), so a checkpoint written on
        one mesh restores on any other, CPU included. The tree structure and shapes must match the
        saved ones exactly (strict: no silent partial restore); dtypes follow the target (orbax
        casts). Without a target an item is restored with its saved shardings, which needs the
        same devices. Restoring only `("memory",)` or only `("state",)` is one call.

        Args:
          step: step to restore; None = latest committed.
          abstract_state: target for "state", or None.
          abstract_memory: target for "memory", or None.
          items: subset of ("state", "memory", "data", "meta").

        Returns:
          A dict with one entry per requested item: "state"/"memory" pytrees ("memory" is `{}`
          when the checkpoint holds no tables), "data" this process's iterator state dict (None
          when none was saved), "meta" the metadata dict.

        Raises:
          FileNotFoundError: missing directory or step.
          CheckpointMismatchError: "data" requested but saved with another process count.
          CheckpointReadError: an item is corrupt or does not match its target; the message names
            the path, step and item.
        """
        unknown = [i for i in items if i not in ITEMS]
        if unknown or not items:
            raise ValueError(
                f"restore: items={tuple(items)}; expected a non-empty subset of {ITEMS}"
            )
        step = self._resolve_step(step, "restore")
        meta = self._restore_item(step, "meta", ocp.args.JsonRestore())
        info = meta.get(RESERVED_META_KEY, {})
        saved_items = info.get("items", ITEMS)
        result: dict[str, Any] = {}
        for item in items:
            if item == "meta":
                result["meta"] = meta
            elif item not in saved_items:
                result[item] = {} if item == "memory" else None
                if item == "state":
                    raise CheckpointReadError(
                        f"checkpoint step {step} at {self._step_path(step)} has no 'state' item"
                    )
            elif item == "data":
                saved_count = info.get("process_count")
                if saved_count != jax.process_count():
                    raise CheckpointMismatchError(
                        f"checkpoint step {step} at {self._step_path(step)}: item 'data' was "
                        f"saved by {saved_count} processes, this run has {jax.process_count()}; "
                        "iterator states cannot be remapped automatically (restore without "
                        "'data' to restart the input pipeline)"
                    )
                result["data"] = self._restore_item(step, "data", _DataRestore())
            else:
                args = (
                    ocp.args.StandardRestore(abstract_state)
                    if item == "state"
                    else memory_item.MemoryRestore(abstract_memory)
                )
                result[item] = self._restore_item(step, item, args)
        logger.info("restored checkpoint step %d items %s", step, tuple(items))
        return result

    def restore_all_data(self, step: int | None = None) -> dict[int, dict[str, Any]]:
        """The iterator states saved by every process of `step` (default latest), as {process
        index: state}, whatever this run's process count (for remapping data shards).

        Raises:
          FileNotFoundError: no such step.
          CheckpointReadError: the item is missing or unreadable.
        """
        step = self._resolve_step(step, "restore_all_data")
        return self._restore_item(step, "data", _DataRestore(all_processes=True))

    def _restore_item(self, step: int, item: str, args: ocp.args.CheckpointArgs) -> Any:
        """Restores one item, wrapping orbax's exceptions with the path, step and item."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{item: args}))
        except Exception as e:
            raise CheckpointReadError(
                f"cannot restore item {item!r} of checkpoint step {step} from "
                f"{self._step_path(step) / item}: {type(e).__name__}: {e}"
            ) from e
        return restored[item]


# --------------------------------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------------------------------

_MISSING = object()


def _flatten_dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"num_layers": 4}} -> {"model.num_layers": 4}; non-dict values are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten_dotted(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _normalise(value: Any) -> Any:
    """JSON round-trip view of a value (tuples == lists), so saved and live configs compare."""
    return json.loads(json.dumps(value, default=str))


def check_compatible(
    saved_meta: Mapping[str, Any],
    current_meta: Mapping[str, Any],
    *,
    keys_must_match: Sequence[str],
    may_differ: Sequence[str] = (),
) -> list[str]:
    """Refuses a checkpoint whose metadata differs from the current run's on the given keys.

    Nested dicts are compared by dotted key: `"model"` selects every key under `model`,
    `"model.num_layers"` one key, `"hasher_fingerprint"` a top-level value. Values are compared
    after a JSON round trip (tuples equal lists). Every difference is reported, not only the first.

    Args:
      saved_meta: metadata read from the checkpoint (`CheckpointStore.read_metadata`).
      current_meta: the same fields for the current run.
      keys_must_match: dotted keys or prefixes that must be equal.
      may_differ: dotted keys or prefixes inside those that may change (settings that change how
        the step is computed, not what the parameters mean, e.g. `model.remat`).

    Returns:
      The allowed differences, one line each (`model.remat: checkpoint False, config True`).

    Raises:
      CheckpointMismatchError: listing each differing key as
        `model.num_layers: checkpoint 4, config 6` (`<missing>` when absent on one side).
    """
    saved_flat = _flatten_dotted(_normalise(dict(saved_meta)))
    current_flat = _flatten_dotted(_normalise(dict(current_meta)))

    def selected(name: str, keys: Sequence[str]) -> bool:
        return any(name == key or name.startswith(f"{key}.") for key in keys)

    problems, allowed = [], []
    for key in keys_must_match:
        names = sorted({name for name in (*saved_flat, *current_flat) if selected(name, [key])})
        if not names:
            problems.append(f"{key}: missing in both checkpoint and config")
        for name in names:
            old = saved_flat.get(name, _MISSING)
            new = current_flat.get(name, _MISSING)
            if not _values_equal(old, new):
                line = f"{name}: checkpoint {_show(old)}, config {_show(new)}"
                (allowed if selected(name, may_differ) else problems).append(line)
    if problems:
        raise CheckpointMismatchError(
            "checkpoint is incompatible with the current config ("
            f"{len(problems)} difference{'s' if len(problems) > 1 else ''}):\n  "
            + "\n  ".join(problems)
        )
    return allowed


def _values_equal(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN (a config may hold NaN placeholders)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _show(value: Any) -> str:
    """Short repr for error messages."""
    return "<missing>" if value is _MISSING else repr(value)


def _check_step(step: Any, what: str) -> int:
    """Steps are non-negative ints (numpy/jax integer scalars accepted)."""
    try:
        as_int = int(step)
    except (TypeError, ValueError):
        raise TypeError(f"{what}: step={step!r}; expected a non-negative int") from None
    if as_int != step or as_int < 0:
        raise ValueError(f"{what}: step={step!r}; expected a non-negative int")
    return as_int


def _check_json(value: Any, name: str, step: int) -> None:
    """Fails in the caller's thread, not in orbax's background writer."""
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"save step {step}: {name} is not JSON-serialisable: {e}; pass plain dicts, lists, "
            "strings and numbers (e.g. config.to_dict())"
        ) from e
