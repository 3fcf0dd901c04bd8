"""Sparse Engram-table training steps: gather the step's unique rows, differentiate with respect to
them, update only those rows (docs/design.md §1.11 gives the tables their own optimizer).

The data pipeline deduplicates each batch's table rows on the host (`data.unique_table_rows`):
`memory_ids [S, L_e, U]` (flat row ids per batch group and layer, -1 = padding) and
`memory_inverse [B, L_e, T, M]`. A step then
1. gathers `rows [S, L_e, U, W]` from the tables (row-sharded lookups on a mesh: each shard reads
   only its rows, partial rows summed with `psum`, as `sharding.vocab_parallel_lookup`);
2. expands them to `[B, L_e, T, M, W]` through the inverse index and runs the model on them, so
   the gradient with respect to the gathered rows is `[S, L_e, U, W]`, duplicates already summed
   by the gather's transpose;
3. applies `row_optim.RowOptimizer` to those rows only. With S > 1 groups, a row read by two
   groups is summed once more on device (a sort of the step's ids, never of the table). On a mesh
   every row shard updates only the rows it owns, inside `shard_map`; the table and its state are
   never gathered, and no table-sized gradient exists anywhere.

`make_row_grad_step` stops after step 2 and returns the row gradients, of the Engram rows and of
the token tables' (OverEncoding, PLE) rows alike: host-resident tables (`tables/host_tables.py`)
apply the update on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from engram_jax import matformer, objective
from engram_jax.model import MOE_BIAS, Transformer, layer_runs
from engram_jax.sharding import TABLE_ROW_AXES
from engram_jax.tables.row_optim import RowOptimizer
from engram_jax.tables.unique_rows import sum_rows


def table_paths(config: Any) -> list[tuple[str, ...]]:
    """Path of every Engram table in the memory tree, in `config.engram.layer_ids` order."""
    names = {run.start: run.name for run in layer_runs(config)}
    return [(names[layer], "engram", "table") for layer in config.engram.layer_ids]


def token_tables(config: Any) -> list[tuple[str, tuple[str, ...]]]:
    """`(name, path)` of the memory tables whose rows a batch names by token (OverEncoding's
    n-gram sub-tables, the per-layer-embedding table); `name` keys `Transformer`'s
    `memory_rows`."""
    out = []
    if config.overencoding.active:
        out.append(("overencoding", ("overencoding", "table")))
    if config.ple.enabled:
        out.append(("ple", ("ple", "table")))
    return out


def ultramem_tables(config: Any) -> list[tuple[str, tuple[str, ...]]]:
    """`(memory_rows key, path)` of every UltraMem value table, in layer order. Their rows are
    found inside the forward pass (addressed by the hidden state)."""
    return [
        (f"ultramem/{run.name}", (run.name, "ultramem", "values"))
        for run in layer_runs(config)
        if run.has_ultramem
    ]


def has_memory_tables(config: Any) -> bool:
    """Whether the model has tables that the table optimizer trains."""
    return config.engram.enabled or bool(token_tables(config)) or config.ultramem.enabled


def token_table_ids(config: Any, name: str, batch: dict[str, jax.Array]) -> jax.Array:
    """`[B, T, M]` flat row ids of token table `name` for a batch: OverEncoding's host ids
    (`overencoding_ids`, else the same ids computed here), the PLE row of every token."""
    from engram_jax.model import overencoding_table_sizes
    from engram_jax.overencoding import ngram_ids_device
    from engram_jax.ple import ple_token_ids

    if name == "ple":
        return ple_token_ids(batch["inputs"], config.ple.rows(config.vocab_size))[..., None]
    if "overencoding_ids" in batch:
        return batch["overencoding_ids"]
    o = config.overencoding
    return ngram_ids_device(
        batch["inputs"],
        batch["segment_ids"],
        config.vocab_size,
        o.max_ngram,
        o.tables_per_ngram,
        overencoding_table_sizes(config),
    )


def get_path(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Sequence[str], value: Any) -> dict:
    """A copy of nested dict `tree` with `value` at `path` (the other branches shared; missing
    branches are created)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = set_path(tree.get(path[0], {}), path[1:], value)
    return out


def gather_rows(table_RW: jax.Array, ids_SU: jax.Array, lookup_fn: Callable | None) -> jax.Array:
    """`[S, U, W]` rows at flat ids `[S, U]`; padding ids (-1) read zero rows."""
    num_rows = table_RW.shape[0]
    ids_SU = jnp.where(ids_SU < 0, num_rows, ids_SU).astype(jnp.int32)  # R reads zeros
    if lookup_fn is None:
        # [R, W] take [S, U] -> [S, U, W]
        return jnp.take(table_RW, ids_SU, axis=0, mode="fill", fill_value=0)
    return lookup_fn(table_RW, ids_SU)


def expand_rows(rows_SLUW: jax.Array, inverse_BLTM: jax.Array) -> jax.Array:
    """Each token's rows from its batch group's unique rows: `[S, L, U, W]` -> `[B, L, T, M, W]`."""
    s, num_layers, _, w = rows_SLUW.shape
    b, _, t, m = inverse_BLTM.shape
    inverse_SbLTM = inverse_BLTM.reshape(s, b // s, num_layers, t, m)  # [B, ...] -> [S, B/S, ...]

    def one_group(rows_LUW, inverse_bLTM):
        def one_layer(rows_UW, inverse_bTM):
            return jnp.take(rows_UW, inverse_bTM, axis=0)  # [U, W] take [b, T, M] -> [b, T, M, W]

        return jax.vmap(one_layer, in_axes=(0, 1), out_axes=1)(rows_LUW, inverse_bLTM)

    rows_SbLTMW = jax.vmap(one_group)(rows_SLUW, inverse_SbLTM)  # [S, B/S, L, T, M, W]
    return rows_SbLTMW.reshape(b, num_layers, t, m, w)  # [S, B/S, ...] -> [B, ...]


def _update_local(
    opt: RowOptimizer,
    table_RW: jax.Array,
    state: dict[str, jax.Array],
    ids_N: jax.Array,
    grads_NW: jax.Array,
    lr: jax.Array,
    start: jax.Array | int,
    dedup: bool,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """Updates the rows of one table block `[start, start + R_local)` that `ids_N` name.

    Returns the new block, its new state and the squared norm of the summed gradients of the
    block's rows (for the gradient-norm metric).
    """
    local_rows = table_RW.shape[0]
    local_N = ids_N - start
    mine_N = (ids_N >= 0) & (local_N >= 0) & (local_N < local_rows)
    local_N = jnp.where(mine_N, local_N, local_rows)  # other blocks' rows and padding: past the end
    if dedup:
        # A row read by several batch groups: sum its gradients into one slot (sorts ids only).
        local_N, grads_NW = sum_rows(
            local_N, grads_NW, size=local_N.shape[0], fill_value=local_rows, xp=jnp
        )
    valid_N = local_N < local_rows
    grads_NW = jnp.where(valid_N[:, None], grads_NW, 0.0).astype(jnp.float32)
    rows_NW = jnp.take(table_RW, local_N, axis=0, mode="fill", fill_value=0)
    state_N = {k: jnp.take(v, local_N, axis=0, mode="fill", fill_value=0) for k, v in state.items()}
    new_rows_NW, new_state_N = opt.update_rows(rows_NW, grads_NW, state_N, lr, xp=jnp)
    # Index local_rows is out of bounds: padding and foreign rows are dropped, never written.
    table_RW = table_RW.at[local_N].set(new_rows_NW.astype(table_RW.dtype), mode="drop")
    state = {
        k: v.at[local_N].set(new_state_N[k].astype(v.dtype), mode="drop") for k, v in state.items()
    }
    return table_RW, state, jnp.sum(grads_NW * grads_NW)


def update_table(
    opt: RowOptimizer,
    table_RW: jax.Array,
    state: dict[str, jax.Array],
    ids_SU: jax.Array,
    grads_SUW: jax.Array,
    lr: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """Sparse update of one table from its groups' unique ids and row gradients.

    On a mesh whose table-row axes have more than one device (the context mesh of `jax.set_mesh`),
    every row shard updates its own block inside `shard_map`; the ids and gradients (batch-sized)
    are replicated to it, the table and state stay sharded.

    Returns:
      `(table, state, squared norm of the summed row gradients)`.
    """
    s, u, w = grads_SUW.shape
    ids_N = ids_SU.reshape(s * u)  # [S, U] -> [S*U]
    grads_NW = grads_SUW.reshape(s * u, w)  # [S, U, W] -> [S*U, W]
    dedup = s > 1
    mesh = jax.sharding.get_abstract_mesh()
    row_axes = tuple(a for a in TABLE_ROW_AXES if not mesh.empty and a in mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in row_axes) if row_axes else 1
    if shards == 1:
        return _update_local(opt, table_RW, state, ids_N, grads_NW, lr, 0, dedup)

    def local(table_RW, state, ids_N, grads_NW, lr):
        start = jax.lax.axis_index(row_axes) * table_RW.shape[0]
        table_RW, state, sq = _update_local(opt, table_RW, state, ids_N, grads_NW, lr, start, dedup)
        return table_RW, state, jax.lax.psum(sq, row_axes)

    def spec(x):
        return PartitionSpec(row_axes, *([None] * (x.ndim - 1)))

    state_specs = {k: spec(v) for k, v in state.items()}
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec(table_RW), state_specs, PartitionSpec(), PartitionSpec(), PartitionSpec()),
        out_specs=(spec(table_RW), state_specs, PartitionSpec()),
    )
    return fn(table_RW, state, ids_N, grads_NW, jnp.asarray(lr, jnp.float32))


ENGRAM_ROWS = "engram"  # the key of the Engram layers' rows among a host step's rows


def make_row_grad_step(
    model: Transformer, dense_tx: optax.GradientTransformation, schedule: optax.Schedule
) -> Callable:
    """`step(state, batch, rows) -> (state, metrics, row_grads)` for rows gathered on the host.

    `rows` (and `row_grads`, same shapes) hold `"engram"`: the Engram layers' unique rows
    `[S, L_e, U, W]`, and per token table (`token_tables`) its rows of every token laid out as
    `[B, 1, T*M, W]` (the host tables' `[S, L, U]` form with one group per sequence). Updates the
    dense parameters (and the step counter and MoE biases) like the dense step; `state.memory` is
    left as it is.
    """
    step = _make_rows_grad_step(model, dense_tx, schedule)

    def host_rows_step(state, batch, rows):
        engram_rows_SLUW, token_rows = split_host_rows(batch, rows)
        new_state, metrics, engram_grads, token_grads, _ = step(
            state, batch, engram_rows_SLUW, token_rows or None
        )
        # [B, T, M, W] -> [B, 1, T*M, W], the layout the host gathered them in.
        grads = {k: g.reshape(rows[k].shape) for k, g in (token_grads or {}).items()}
        if engram_grads is not None:
            grads[ENGRAM_ROWS] = engram_grads
        return new_state, metrics, grads

    return host_rows_step


def split_host_rows(
    batch: dict[str, jax.Array], rows: dict[str, jax.Array]
) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    """Host-gathered rows (`make_row_grad_step`) as the Engram rows `[S, L_e, U, W]` (or None) and
    each token table's rows `[B, T, M, W]`."""
    b, t = batch["inputs"].shape
    token_rows = {
        k: v.reshape(b, t, -1, v.shape[-1])  # [B, 1, T*M, W] -> [B, T, M, W]
        for k, v in rows.items()
        if k != ENGRAM_ROWS
    }
    return rows.get(ENGRAM_ROWS), token_rows


def host_rows_for_model(
    batch: dict[str, jax.Array], rows: dict[str, jax.Array] | None
) -> tuple[jax.Array | None, dict[str, Any] | None]:
    """The `engram_rows [B, L_e, T, M, W]` and `memory_rows` arguments of `Transformer` for a
    forward pass without gradients (evaluation) on host-gathered rows; `(None, None)` when the
    model reads its own tables."""
    if rows is None:
        return None, None
    engram_rows_SLUW, token_rows = split_host_rows(batch, rows)
    engram_rows = None
    if engram_rows_SLUW is not None:
        engram_rows = expand_rows(engram_rows_SLUW, batch["memory_inverse"])
    return engram_rows, _model_rows(batch, token_rows, None)


def _model_rows(batch, memory_rows, fixed_rows) -> dict[str, Any] | None:
    """The `memory_rows` argument of `Transformer` from the step's gathered token-table rows
    (differentiated) and UltraMem's value tables (`fixed_rows`, outside the gradient)."""
    if not memory_rows:
        return None
    b, t = batch["inputs"].shape
    # PLE reads one [L*p] row per token; OverEncoding K rows [K, W].
    rows = {k: (v.reshape(b, t, -1) if k == "ple" else v) for k, v in memory_rows.items()}
    for k, v in (fixed_rows or {}).items():
        rows[k] = {**rows.get(k, {}), **v}
    return rows


def _make_rows_grad_step(
    model: Transformer, dense_tx: optax.GradientTransformation, schedule: optax.Schedule
) -> Callable:
    """`step(state, batch, rows [S, L_e, U, W] | None, memory_rows {name: [B, T, M, W]} | None,
    fixed_rows {name: {...}} | None) -> (state, metrics, row_grads, memory_row_grads, aux)`:
    `make_row_grad_step` with the rows of the token tables (`token_tables`) and UltraMem's zero
    deltas (`{"delta": [B, T, k, d_v]}`) as a differentiated input; `fixed_rows` (UltraMem's
    value tables, `{"values": [P, d_v]}`) join them outside the gradient."""

    def step(state, batch, rows_SLUW, memory_rows, fixed_rows=None):
        def loss_fn(params, rows, moe_bias, batch):
            engram_rows_SLUW, token_rows = rows
            rows_BLTMW = None
            if engram_rows_SLUW is not None:
                rows_BLTMW = expand_rows(engram_rows_SLUW, batch["memory_inverse"])
            variables = {"params": params, MOE_BIAS: moe_bias}
            return objective.training_loss(
                model,
                variables,
                batch,
                engram_rows=rows_BLTMW,
                memory_rows=_model_rows(batch, token_rows, fixed_rows),
            )

        step_loss = matformer.per_step_loss(loss_fn, model.config, state.step)
        grad_fn = jax.value_and_grad(step_loss, argnums=(0, 1), has_aux=True)
        (_, (loss, aux, moe_bias)), (dense_grads, (row_grads, memory_grads)) = grad_fn(
            state.params, (rows_SLUW, memory_rows), state.moe_bias, batch
        )
        updates, opt_state = dense_tx.update(dense_grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = objective.step_metrics(loss, aux, dense_grads, schedule(state.step))
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, moe_bias=moe_bias
        )
        return new_state, metrics, row_grads, memory_grads, aux

    return step


def _update_tables(table_opt: RowOptimizer, memory, memory_opt_state, updates, lr):
    """`update_table` for each `(path, ids, grads)` of `updates`; returns the new tables, their
    optimizer state and the summed squared norm of the touched rows' gradients."""
    sq = 0.0
    for p, ids, grads in updates:
        table, table_state, sq_i = update_table(
            table_opt, get_path(memory, p), get_path(memory_opt_state, p), ids, grads, lr
        )
        memory = set_path(memory, p, table)
        memory_opt_state = set_path(memory_opt_state, p, table_state)
        sq = sq + sq_i
    return memory, memory_opt_state, sq


def make_sparse_train_step(
    model: Transformer,
    dense_tx: optax.GradientTransformation,
    table_opt: RowOptimizer,
    schedule: optax.Schedule,
) -> Callable:
    """The sparse device step `step(state, batch) -> (state, metrics)` (module docstring).

    `metrics["memory_grad_norm"]` is the norm of the summed gradients of the touched rows, which
    equals the dense table gradient's norm.
    """
    paths = table_paths(model.config)
    tokens = token_tables(model.config)
    hidden_addressed = ultramem_tables(model.config)
    row_grad_step = _make_rows_grad_step(model, dense_tx, schedule)

    def step(state, batch):
        rows_SLUW = None
        if paths:
            ids_SLU = batch["memory_ids"]
            rows = [
                gather_rows(get_path(state.memory, p), ids_SLU[:, i], model.lookup_fn)
                for i, p in enumerate(paths)
            ]
            rows_SLUW = jnp.stack(rows, axis=1)  # L x [S, U, W] -> [S, L, U, W]
        # Token tables: every token's rows [B, T, M, W], gathered here; a row read twice is
        # summed once by the update's dedup.
        token_ids = {name: token_table_ids(model.config, name, batch) for name, _ in tokens}
        memory_rows = {}
        for name, p in tokens:
            ids_BTM = token_ids[name]
            b, t, m = ids_BTM.shape
            rows_XMW = gather_rows(
                get_path(state.memory, p), ids_BTM.reshape(b * t, m), model.lookup_fn
            )
            memory_rows[name] = rows_XMW.reshape(b, t, m, -1)  # [B*T, M, W] -> [B, T, M, W]
        # UltraMem: the value rows a token reads are chosen inside the layer. The step passes
        # the table (read outside the gradient) and a zero delta added to the rows read; the
        # delta's gradient is theirs, and the layer reports which rows they were.
        u, (b, t) = model.config.ultramem, batch["inputs"].shape
        fixed_rows = {}
        for name, p in hidden_addressed:
            fixed_rows[name] = {"values": get_path(state.memory, p)}
            memory_rows[name] = {"delta": jnp.zeros((b, t, u.top_k, u.value_width), jnp.float32)}
        lr = table_opt.lr(state.step)
        new_state, metrics, grads_SLUW, token_grads, aux = row_grad_step(
            state, batch, rows_SLUW, memory_rows or None, fixed_rows or None
        )
        for i, (name, _) in enumerate(hidden_addressed):
            token_ids[name] = aux["ultramem_slots"][i] % u.value_rows  # [B, T, k] physical rows
            token_grads[name] = token_grads[name]["delta"]
        updates = []  # (path, ids [S, U], grads [S, U, W]) of every table the step touched
        for name, p in tokens + hidden_addressed:
            grads_BTMW = token_grads[name]
            # [B*T*M, 1]: S > 1 groups, deduplicated
            ids = token_ids[name].reshape(-1, 1)
            updates.append((p, ids, grads_BTMW.reshape(-1, 1, grads_BTMW.shape[-1])))
        updates += [(p, ids_SLU[:, i], grads_SLUW[:, i]) for i, p in enumerate(paths)]
        memory, memory_opt_state, sq = _update_tables(
            table_opt, state.memory, state.memory_opt_state, updates, lr
        )
        metrics["memory_grad_norm"] = jnp.sqrt(sq)
        return new_state.replace(memory=memory, memory_opt_state=memory_opt_state), metrics

    return step
