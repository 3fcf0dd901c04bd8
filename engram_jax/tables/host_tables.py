"""Host-resident memory tables for training: numpy tables and row-optimizer state in host RAM,
the next step's rows prefetched while the current step runs, sparse updates applied on the host.

The tables are those whose rows a batch names before the step runs: Engram's (hashed n-grams,
`memory_ids` from the input pipeline) and the token tables (OverEncoding's n-gram rows, from the
pipeline's `overencoding_ids`; PLE's row of every token). UltraMem's value rows are chosen inside
the forward pass and cannot live here (docs/design.md). The tables come in row sets
(`row_sets`): each set's ids are `[S, L, U]` (S batch groups, L tables, U ids per group, -1 =
padding), its rows `[S, L, U, W]`; Engram's set is `memory_ids` itself, a token table's set is
its per-token ids `[B, T, M]` as `[B, 1, T*M]`.

Timeline of step t (one background worker thread, FIFO, so its jobs never reorder):
1. `rows_t` were gathered by the worker during step t-1 and patched after step t-1's update
   (below); they are on the device when step t is dispatched.
2. Step t runs on the device (`device_step.make_row_grad_step`) and returns the row gradients.
   Meanwhile the worker gathers `rows_{t+1}` for the next batch's unique ids from the host table.
   Those reads may predate step t's update.
3. When the gradients arrive, the host updates first the rows that step t+1 also reads
   (`ids_t ∩ ids_{t+1}`, per table) and re-reads exactly those into `rows_{t+1}`: nothing step
   t+1 sees is stale. `rows_{t+1}` is then transferred, and the remaining rows of step t
   (`ids_t \\ ids_{t+1}`) are updated by the worker while step t+1 computes. Since the
   worker is FIFO, the gather for step t+2 runs after that update; rows that both updates could
   touch are disjoint (`ids_t \\ ids_{t+1}` vs. a subset of `ids_{t+1}`), so the main
   thread and the worker never write the same row.

`HostTables` is also usable on its own (e.g. for inference): `gather(ids)` reads rows,
`memory_item()`/`load_memory_item()` convert to and from the checkpoint's `memory` item, which has
the same layout as device tables, so a checkpoint moves between placements.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from engram_jax.tables.device_step import (
    ENGRAM_ROWS,
    get_path,
    set_path,
    table_paths,
    token_tables,
)
from engram_jax.tables.row_files import take_rows
from engram_jax.tables.row_optim import RowOptimizer
from engram_jax.tables.unique_rows import sum_rows

Path = tuple[str, ...]


def _members(ids_X: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """`np.isin(ids_X, pool)` for the few thousand ids of a step, by binary search in the sorted
    pool: `np.isin` hashes or sorts both arrays on every call, and these calls run between a step
    and the next (about 1 ms of the toy bench's 45 ms step, twice per step)."""
    sorted_P = np.sort(pool.reshape(-1))
    if sorted_P.size == 0:
        return np.zeros(ids_X.shape, bool)
    at_X = np.minimum(np.searchsorted(sorted_P, ids_X), sorted_P.size - 1)
    return sorted_P[at_X] == ids_X


def _nested(items: dict[Path, Any]) -> dict:
    tree: dict = {}
    for path, value in items.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def row_sets(config: Any) -> dict[str, list[Path]]:
    """The host row sets of a model config: `"engram"` (the Engram layers' tables, in
    `layer_ids` order) and one per token table (`device_step.token_tables`), in that order."""
    sets: dict[str, list[Path]] = {}
    if config.engram.enabled:
        sets[ENGRAM_ROWS] = table_paths(config)
    for name, path in token_tables(config):
        sets[name] = [path]
    return sets


def row_ids(config: Any, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """The ids `[S, L, U]` of every row set (`row_sets`) that `batch` reads, on the host."""
    from engram_jax.overencoding_ids import OverEncodingIds
    from engram_jax.ple import ple_token_ids

    def host(key: str) -> np.ndarray:
        return np.asarray(jax.device_get(batch[key]))

    ids: dict[str, np.ndarray] = {}
    if config.engram.enabled:
        ids[ENGRAM_ROWS] = host("memory_ids")
    for name, _ in token_tables(config):
        if name == "ple":
            ids_BTM = ple_token_ids(host("inputs"), config.ple.rows(config.vocab_size), np)[
                ..., None
            ]
        elif "overencoding_ids" in batch:  # the input pipeline's
            ids_BTM = host("overencoding_ids")
        else:
            ids_BTM = OverEncodingIds.from_model_config(config)(host("inputs"), host("segment_ids"))
        b = ids_BTM.shape[0]
        ids[name] = ids_BTM.reshape(b, 1, -1)  # [B, T, M] -> [B, 1, T*M]
    return ids


def _same_ids(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


class HostTables:
    """Memory tables `[R, W]` (float32 numpy) and their `RowOptimizer` state, per table.

    Args:
      tables: the tables, each keyed by its memory-tree path.
      opt: the row optimizer (its state layout is `opt.state_shapes`).
      state: optimizer state per path (numpy); None starts fresh.
      sets: the row sets (module docstring), each a list of paths of one row width; None: one
        set `"engram"` of every table, in the order of `tables`.
    """

    def __init__(
        self,
        tables: dict[Path, np.ndarray],
        opt: RowOptimizer,
        state: dict[Path, dict[str, np.ndarray]] | None = None,
        sets: Mapping[str, Sequence[Path]] | None = None,
    ):
        self.paths: list[Path] = list(tables)
        self.sets = {k: list(v) for k, v in (sets or {ENGRAM_ROWS: self.paths}).items()}
        # Writeable, contiguous float32 (arrays fetched from jax are read-only views).
        self.tables = {p: np.require(t, np.float32, ["C", "W"]) for p, t in tables.items()}
        self.opt = opt
        self.state = (
            {p: {k: np.array(v) for k, v in state[p].items()} for p in self.paths}
            if state is not None
            else {p: opt.init_numpy(*t.shape) for p, t in self.tables.items()}
        )
        for key, paths in self.sets.items():
            widths = {self.tables[p].shape[1] for p in paths}
            if len(widths) != 1:
                raise ValueError(
                    f"HostTables: row set {key!r} has row widths {sorted(widths)}; expected one "
                    "(its rows are stacked)"
                )

    @classmethod
    def from_memory(
        cls,
        memory: Any,
        memory_opt_state: Any,
        sets: Mapping[str, Sequence[Path]] | Sequence[Path],
        opt: RowOptimizer,
    ) -> HostTables:
        """From a (device or numpy) memory tree and its row-optimizer state tree (empty: fresh
        optimizer state); `sets` as in the constructor, or a list of paths (one `"engram"` set).
        Numpy tables are used in place, not copied."""
        if not isinstance(sets, Mapping):
            sets = {ENGRAM_ROWS: list(sets)}
        paths = [p for set_paths in sets.values() for p in set_paths]
        tables = {p: np.asarray(jax.device_get(get_path(memory, p))) for p in paths}
        if not memory_opt_state:
            return cls(tables, opt, sets=sets)
        state = {
            p: {k: np.asarray(jax.device_get(v)) for k, v in get_path(memory_opt_state, p).items()}
            for p in paths
        }
        return cls(tables, opt, state, sets)

    @property
    def num_params(self) -> int:
        return sum(t.size for t in self.tables.values())

    # -- rows -------------------------------------------------------------------------------------

    def gather(self, ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per row set, `[S, L, U, W]` float32 rows at its flat ids `[S, L, U]` (-1 padding reads
        zeros)."""
        out = {}
        for key, paths in self.sets.items():
            # L x [S, U, W] -> [S, L, U, W]
            out[key] = np.stack(
                [take_rows(self.tables[p], ids[key][:, i]) for i, p in enumerate(paths)], 1
            )
        return out

    def patch(
        self, rows: dict[str, np.ndarray], ids: dict[str, np.ndarray], stale: dict[Path, np.ndarray]
    ) -> None:
        """Re-reads, in place, the rows of `rows` whose ids are in `stale[path]`."""
        for key, paths in self.sets.items():
            for li, p in enumerate(paths):
                ids_SU = ids[key][:, li]
                redo = (ids_SU >= 0) & _members(ids_SU, stale[p])
                if redo.any():
                    rows[key][:, li][redo] = self.tables[p][ids_SU[redo]]

    @staticmethod
    def summed_grads(
        ids_SU: np.ndarray, grads_SUW: np.ndarray, unique_groups: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Distinct valid ids `[N]` and their gradients summed over the groups `[N, W]`;
        `unique_groups`: each group's ids are distinct (Engram's, deduplicated by the input
        pipeline), not so a token table's."""
        ids_N = ids_SU.reshape(-1)
        grads_NW = grads_SUW.reshape(ids_N.size, -1)
        valid = ids_N >= 0
        if unique_groups and ids_SU.shape[0] == 1:
            return ids_N[valid], grads_NW[valid]  # the host already deduplicated one group
        return sum_rows(ids_N[valid], grads_NW[valid])

    def apply_rows(self, path: Path, ids_N: np.ndarray, grads_NW: np.ndarray, lr: float) -> None:
        """Sparse update of distinct rows `ids_N` of one table with their summed gradients."""
        if ids_N.size == 0:
            return
        table, state = self.tables[path], self.state[path]
        new_rows, new_state = self.opt.update_rows(
            table[ids_N], grads_NW, {k: v[ids_N] for k, v in state.items()}, lr, xp=np
        )
        table[ids_N] = new_rows
        for k, v in new_state.items():
            state[k][ids_N] = v

    # -- checkpoint item --------------------------------------------------------------------------

    def memory_item(self, copy: bool = True) -> dict[str, Any]:
        """`{"tables": tree, "opt_state": tree}` exactly like the device placement's memory item.

        `copy=True` snapshots the arrays, so an asynchronous checkpoint write never sees later
        updates (costs one table-sized copy per save).
        """
        take = np.copy if copy else (lambda x: x)
        return {
            "tables": _nested({p: take(t) for p, t in self.tables.items()}),
            "opt_state": _nested(
                {p: {k: take(v) for k, v in self.state[p].items()} for p in self.paths}
            ),
        }

    def load_memory_item(self, item: dict[str, Any]) -> None:
        """Replaces tables and state with a restored memory item (shapes must match)."""
        for p in self.paths:
            table = np.asarray(get_path(item["tables"], p), np.float32)
            if table.shape != self.tables[p].shape:
                raise ValueError(
                    f"HostTables: restored table {'/'.join(p)} has shape {table.shape}; expected "
                    f"{self.tables[p].shape}"
                )
            self.tables[p] = np.require(table, np.float32, ["C", "W"])
            saved = get_path(item["opt_state"], p)
            self.state[p] = {k: np.array(saved[k]) for k in self.state[p]}


def _engram_ids(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    return {ENGRAM_ROWS: np.asarray(jax.device_get(batch["memory_ids"]))}


class HostTableTrainer:
    """Drives training steps against `HostTables` with prefetch and overlapped updates.

    Args:
      tables: the host tables.
      row_grad_step: jitted `step(state, batch, rows) -> (state, metrics, grads)` with rows and
        grads `{row set: [S, L, U, W]}` (`device_step.make_row_grad_step`).
      put_rows: moves a numpy `[S, L, U, W]` array to the device(s) (with the batch sharding).
      batch_ids: a batch's ids `{row set: [S, L, U]}` on the host (`row_ids`); by default the
        `memory_ids` of an Engram-only model.
    """

    def __init__(
        self,
        tables: HostTables,
        row_grad_step: Callable,
        put_rows: Callable[[np.ndarray], jax.Array] = jax.device_put,
        batch_ids: Callable[[dict[str, Any]], dict[str, np.ndarray]] = _engram_ids,
    ):
        self.tables = tables
        self._step = row_grad_step
        self._put = put_rows
        self.batch_ids = batch_ids
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="host_tables")
        # (ids, device rows) of the next step
        self._next: tuple[dict[str, np.ndarray], dict[str, jax.Array]] | None = None
        self._last_apply: concurrent.futures.Future | None = None
        self.wait_seconds = 0.0  # time the loop spent waiting for rows before dispatching steps
        self.steps = 0

    def rows_for(self, ids: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Device rows for ids, after every queued update (eval batches, the first step)."""
        self.flush()
        return self._put_all(self.tables.gather(ids))

    def _put_all(self, rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {key: self._put(r) for key, r in rows.items()}

    def flush(self) -> None:
        """Waits until every queued host update has been applied (before saving or reading)."""
        if self._last_apply is not None:
            self._last_apply.result()
            self._last_apply = None

    def __call__(
        self, state: Any, batch: dict[str, Any], next_batch: dict[str, Any] | None
    ) -> tuple[Any, dict[str, Any]]:
        """One training step on `batch`; prefetches the rows `next_batch` reads (None: no next).

        The batches' ids must be readable on this host (single process).
        """
        ids = self.batch_ids(batch)
        start = time.perf_counter()
        if self._next is not None and _same_ids(self._next[0], ids):
            rows = self._next[1]
        else:
            rows = self.rows_for(ids)
        self._next = None
        self.wait_seconds += time.perf_counter() - start
        step_index = int(jax.device_get(state.step))
        lr = float(self.tables.opt.lr(step_index))
        state, metrics, grads = self._step(state, batch, rows)
        next_ids = prefetch = None
        if next_batch is not None:
            next_ids = self.batch_ids(next_batch)
            prefetch = self._worker.submit(self.tables.gather, next_ids)
        grads = jax.device_get(grads)  # waits for the device step
        sq, later, stale = self._apply_shared_rows(ids, grads, next_ids, lr)
        if prefetch is not None:
            rows_next = prefetch.result()
            self.tables.patch(rows_next, next_ids, stale)
            self._next = (next_ids, self._put_all(rows_next))

        def apply_later():
            for p, ids_N, g_NW in later:
                self.tables.apply_rows(p, ids_N, g_NW, lr)

        self._last_apply = self._worker.submit(apply_later)
        self.steps += 1
        metrics = dict(metrics)
        metrics["memory_grad_norm"] = np.float32(np.sqrt(sq))
        return state, metrics

    def _apply_shared_rows(
        self,
        ids: dict[str, np.ndarray],
        grads: dict[str, np.ndarray],
        next_ids: dict[str, np.ndarray] | None,
        lr: float,
    ) -> tuple[float, list[tuple[Path, np.ndarray, np.ndarray]], dict[Path, np.ndarray]]:
        """Updates now the rows of this step that the next step reads too (all of them without a
        next step). Returns the squared norm of every summed row gradient, the updates left for
        later `(path, ids, grads)` and the ids updated now per table (`stale`)."""
        sq = 0.0
        later: list[tuple[Path, np.ndarray, np.ndarray]] = []
        stale: dict[Path, np.ndarray] = {}
        for key, paths in self.tables.sets.items():
            grads_SLUW = np.asarray(grads[key])
            for li, p in enumerate(paths):
                ids_N, g_NW = HostTables.summed_grads(
                    ids[key][:, li], grads_SLUW[:, li], unique_groups=key == ENGRAM_ROWS
                )
                sq += float(np.sum(g_NW.astype(np.float64) ** 2))
                if next_ids is None:
                    now = np.ones(ids_N.shape, bool)
                else:
                    now = _members(ids_N, next_ids[key][:, li])
                self.tables.apply_rows(p, ids_N[now], g_NW[now], lr)
                stale[p] = ids_N[now]
                later.append((p, ids_N[~now], g_NW[~now]))
        return sq, later, stale

    def close(self) -> None:
        self.flush()
        self._worker.shutdown(wait=True)


def state_without_tables(state: Any) -> Any:
    """A TrainState whose tables live elsewhere: empty memory and memory optimizer state."""
    return state.replace(memory={}, memory_opt_state={})


__all__ = [
    "HostTableTrainer",
    "HostTables",
    "row_ids",
    "row_sets",
    "set_path",
    "state_without_tables",
]


# ------------------------------------------------------------------------------------------------
# The trainer's hooks (engram_jax.train with table_placement="host").
# ------------------------------------------------------------------------------------------------


class Lookahead:
    """Wraps a grain iterator so the next batch can be read early without moving the saved
    position: `get_state()` is the state before a peeked, not yet consumed batch."""

    def __init__(self, iterator: Any):
        self._it = iterator
        self._peeked: Any = None
        self._state_before_peek: Any = None

    def __iter__(self) -> Lookahead:
        return self

    def __next__(self) -> Any:
        if self._peeked is not None:
            batch, self._peeked = self._peeked, None
            return batch
        return next(self._it)

    def peek(self) -> Any:
        if self._peeked is None:
            self._state_before_peek = self._it.get_state()
            self._peeked = next(self._it)
        return self._peeked

    def get_state(self) -> Any:
        return self._state_before_peek if self._peeked is not None else self._it.get_state()

    def set_state(self, state: Any) -> None:
        self._peeked = None
        self._it.set_state(state)


class HostPlacement:
    """Everything `engram_jax.train` needs for host tables: the trainer, the step with the
    trainer's signature, `with_rows` for the forward passes that read rows (evaluation, mixing
    diagnostics), and the checkpoint's memory item."""

    def __init__(self, model, cfg, state, shardings, dense_tx, table_opt, schedule, mesh):
        from engram_jax import sharding as sharding_lib
        from engram_jax.tables.device_step import make_row_grad_step

        if jax.process_count() > 1:
            raise ValueError(
                f"table_placement: got 'host' with {jax.process_count()} processes; host tables "
                "are single-process (use table_placement='device' on multi-host runs)"
            )
        # `state` comes from `create_train_state(..., table_placement="host")`: numpy tables with
        # the device placement's values, no table optimizer state (fresh here).
        self.tables = HostTables.from_memory(
            state.memory, state.memory_opt_state, row_sets(cfg.model), table_opt
        )
        self.state = state_without_tables(state)
        self.shardings = state_without_tables(shardings)
        batch_sharding = sharding_lib.batch_sharding(mesh)

        def put(rows):
            return jax.make_array_from_process_local_data(batch_sharding, rows)

        row_grad_step = jax.jit(
            make_row_grad_step(model, dense_tx, schedule),
            in_shardings=(self.shardings, batch_sharding, batch_sharding),
            out_shardings=(self.shardings, None, batch_sharding),
            donate_argnums=0,
        )
        self.trainer = HostTableTrainer(
            self.tables, row_grad_step, put, functools.partial(row_ids, cfg.model)
        )
        self.batch_sharding = batch_sharding
        self.lookahead: Lookahead | None = None

    def wrap_iterator(self, iterator: Any) -> Lookahead:
        self.lookahead = Lookahead(iterator)
        return self.lookahead

    def train_step(self, state: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        next_batch = self.lookahead.peek() if self.lookahead is not None else None
        return self.trainer(state, batch, next_batch)

    def with_rows(self, fn: Callable) -> Callable:
        """`fn(state, batch, rows {row set: [S, L, U, W]})` as `(state, batch) -> fn(...)`: the
        rows the batch reads, from the host tables after every queued update. Jit `fn` with
        `in_shardings=(self.shardings, self.batch_sharding, self.batch_sharding)`."""

        def call(state: Any, batch: dict[str, Any]) -> Any:
            return fn(state, batch, self.trainer.rows_for(self.trainer.batch_ids(batch)))

        return call

    def memory_item(self) -> dict[str, Any]:
        """The live tables, after every queued update (no worker job is pending after `flush`):
        `CheckpointStore.save` writes the memory item before it returns, so no snapshot (a
        table-sized copy per save) is needed."""
        self.trainer.flush()
        return self.tables.memory_item(copy=False)

    def abstract_memory_item(self) -> dict[str, Any]:
        """Restore target: numpy-shaped, so orbax restores into host memory."""
        return self.tables.memory_item(copy=False)
