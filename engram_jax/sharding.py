"""Meshes, logical-axis rules and mesh-aware lookups (the row-sharded Engram table lookup).

Model code names logical axes only; the device-level pieces live here and reach the layers as
callables (`Engram(lookup_fn=vocab_parallel_lookup(mesh, "model"))`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from engram_jax import axes
from engram_jax.config import MeshConfig

_AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def make_mesh(
    axis_shapes: Sequence[int],
    axis_names: Sequence[str],
    axis_types: Sequence[AxisType | str] | AxisType | str | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a device mesh, always passing `axis_types` (`jax.make_mesh` now defaults to Explicit).

    Args:
      axis_shapes: size of each mesh axis; their product must equal the number of devices used.
      axis_names: name of each mesh axis (e.g. `("data", "model")`).
      axis_types: one `AxisType` (or "auto"/"explicit") for all axes, or one per axis; None = Auto.
      devices: devices to use; None = all.

    Returns:
      A `jax.sharding.Mesh`.

    Raises:
      ValueError: on mismatched lengths or unknown axis types.
    """
    axis_shapes = tuple(int(s) for s in axis_shapes)
    axis_names = tuple(axis_names)
    if len(axis_shapes) != len(axis_names):
        raise ValueError(
            f"make_mesh: axis_shapes {axis_shapes} and axis_names {axis_names}; "
            "expected equal lengths"
        )
    if axis_types is None:
        axis_types = AxisType.Auto
    if isinstance(axis_types, (str, AxisType)):
        axis_types = (axis_types,) * len(axis_names)
    types = []
    for t in axis_types:
        if isinstance(t, str):
            if t.lower() not in _AXIS_TYPES:
                raise ValueError(
                    f"make_mesh: axis_types entry {t!r}; expected one of {sorted(_AXIS_TYPES)}"
                )
            t = _AXIS_TYPES[t.lower()]
        types.append(t)
    if len(types) != len(axis_names):
        raise ValueError(
            f"make_mesh: axis_types has {len(types)} entries; expected {len(axis_names)} "
            f"(one per axis of {axis_names})"
        )
    return jax.make_mesh(axis_shapes, axis_names, axis_types=tuple(types), devices=devices)


def _as_axes(names: str | Sequence[str] | None) -> tuple[str, ...]:
    if names is None:
        return ()
    if isinstance(names, str):
        return (names,)
    return tuple(names)


def _lookup_axes(
    mesh: Mesh, row_axes: str | Sequence[str], batch_axes: str | Sequence[str] | None
) -> tuple[tuple[str, ...], tuple[str, ...], int, int]:
    """`vocab_parallel_lookup`'s axes as tuples, checked against the mesh, and their shard
    counts."""
    row_axes = _as_axes(row_axes)
    batch_axes = _as_axes(batch_axes)
    for name in row_axes + batch_axes:
        if name not in mesh.axis_names:
            raise ValueError(
                f"vocab_parallel_lookup: axis {name!r}; expected one of mesh.axis_names "
                f"{mesh.axis_names}"
            )
    if not row_axes:
        raise ValueError(
            "vocab_parallel_lookup: row_axes is empty; expected at least one mesh axis"
        )
    if set(row_axes) & set(batch_axes):
        raise ValueError(
            f"vocab_parallel_lookup: row_axes {row_axes} and batch_axes {batch_axes} overlap"
        )
    num_row_shards = 1
    for name in row_axes:
        num_row_shards *= mesh.shape[name]
    num_batch_shards = 1
    for name in batch_axes:
        num_batch_shards *= mesh.shape[name]
    return row_axes, batch_axes, num_row_shards, num_batch_shards


def vocab_parallel_lookup(
    mesh: Mesh,
    row_axes: str | Sequence[str],
    batch_axes: str | Sequence[str] | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Returns a row-sharded `lookup_fn(table_RW, flat_ids) -> rows` for `Engram`.

    Each device along `row_axes` holds one contiguous block of `R / n` rows. It masks the ids
    outside its block, gathers locally (zero rows elsewhere) and the blocks' results are summed
    with `psum` over `row_axes`. The table enters `shard_map` as an argument (never closed over)
    with spec `P(row_axes, None)`, so it is never all-gathered, and its gradient (a local
    scatter-add, summed over the other axes) keeps the table's sharding. Works on Auto and Explicit
    meshes.

    Ids outside `[0, R)` read zero rows on every device (`Engram` maps invalid ids to R).

    Args:
      mesh: the device mesh.
      row_axes: mesh axis (or axes, major first) the table's rows are sharded over.
      batch_axes: mesh axes the ids' (and rows') leading axis is sharded over; None = replicated.

    Returns:
      `lookup_fn(table_RW, flat_ids [N, ...]) -> rows [N, ..., W]` in the table's dtype.

    Raises:
      ValueError: (when called) if R or the leading ids axis is not divisible by its shard count.
    """
    row_axes, batch_axes, num_row_shards, num_batch_shards = _lookup_axes(
        mesh, row_axes, batch_axes
    )
    table_spec = PartitionSpec(row_axes, None)
    lead = batch_axes if batch_axes else None

    def local_lookup(table_local_RW: jax.Array, ids_local: jax.Array) -> jax.Array:
        rows_per_shard = table_local_RW.shape[0]
        start = jax.lax.axis_index(row_axes) * rows_per_shard
        local_ids = ids_local - start  # [N, ...]
        mine = (local_ids >= 0) & (local_ids < rows_per_shard)
        # Ids of other blocks go past the local end and read zeros (negative ids would wrap).
        local_ids = jnp.where(mine, local_ids, rows_per_shard)
        # [R/n, W] take [N, ...] -> [N, ..., W]
        rows_local = jnp.take(table_local_RW, local_ids, axis=0, mode="fill", fill_value=0)
        return jax.lax.psum(rows_local, row_axes)

    def lookup_fn(table_RW: jax.Array, flat_ids: jax.Array) -> jax.Array:
        if table_RW.ndim != 2:
            raise ValueError(
                f"vocab_parallel_lookup: table has shape {table_RW.shape}; expected [R, W]"
            )
        if table_RW.shape[0] % num_row_shards:
            raise ValueError(
                f"vocab_parallel_lookup: table has {table_RW.shape[0]} rows; expected a multiple "
                f"of {num_row_shards} shards over {row_axes} (set Engram.table_row_multiple)"
            )
        if flat_ids.ndim < 1 or flat_ids.shape[0] % num_batch_shards:
            raise ValueError(
                f"vocab_parallel_lookup: ids have shape {flat_ids.shape}; expected a leading axis "
                f"divisible by {num_batch_shards} shards over {batch_axes}"
            )
        ids_spec = PartitionSpec(lead)
        fn = jax.shard_map(
            local_lookup,
            mesh=mesh,
            in_specs=(table_spec, ids_spec),
            out_specs=PartitionSpec(lead),
        )
        flat_ids = flat_ids.astype(jnp.int32)
        if AxisType.Explicit in mesh.axis_types:
            # Explicit axes carry shardings in the types: bring both operands to the specs the
            # shard_map expects (a no-op when they already match, as in a row-sharded train step).
            table_RW = jax.sharding.reshard(table_RW, NamedSharding(mesh, table_spec))
            flat_ids = jax.sharding.reshard(flat_ids, NamedSharding(mesh, ids_spec))
        return fn(table_RW, flat_ids)

    return lookup_fn


# ------------------------------------------------------------------------------------------------
# Meshes from the config, logical axis rules, shardings of trees and batches.
# ------------------------------------------------------------------------------------------------

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes the Engram tables' rows are split over; the lookup sums partial rows over them.
TABLE_ROW_AXES = ("fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or axes). A logical axis whose mesh axis is already used by an
# earlier dimension of the same array falls back to replication (flax's resolution order).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (axes.BATCH, BATCH_AXES),
    (axes.LENGTH, None),
    (axes.ACT_EMBED, None),
    (axes.ACT_STREAMS, None),
    (axes.ACT_HEADS, "tensor"),
    (axes.ACT_KV_HEADS, "tensor"),
    (axes.ACT_MLP, "tensor"),
    (axes.ACT_VOCAB, "tensor"),
    (axes.ACT_MEMORY_HEADS, None),
    (axes.ACT_EXPERTS, "tensor"),
    (axes.EMBED, "fsdp"),
    (axes.VOCAB, "tensor"),
    (axes.MLP, "tensor"),
    (axes.HEADS, "tensor"),
    (axes.KV_HEADS, "tensor"),
    (axes.HEAD_DIM, None),
    (axes.LATENT, None),
    (axes.EXPERTS, "tensor"),
    (axes.STREAMS, None),
    (axes.HC_COEFFS, None),
    (axes.CONV_WIDTH, None),
    (axes.NORM, None),
    (axes.LAYERS, None),
    (axes.TABLE_ROWS, TABLE_ROW_AXES),
    (axes.MEMORY_WIDTH, None),
    (axes.MEMORY_IN, None),
    (axes.MEMORY_TABLES, None),
)


def mesh_from_config(mesh_config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh of a validated config; one axis may be -1 (the rest).

    Raises:
      ValueError: naming the config field when the sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": mesh_config.data, "fsdp": mesh_config.fsdp, "tensor": mesh_config.tensor}
    known = 1
    for size in sizes.values():
        if size != -1:
            known *= size
    for name, size in sizes.items():
        if size == -1:
            if len(devices) % known:
                raise ValueError(
                    f"config.mesh.{name}=-1: {len(devices)} devices are not divisible by the "
                    f"other axes' product {known}"
                )
            sizes[name] = len(devices) // known
    total = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    if total != len(devices):
        raise ValueError(
            f"config.mesh: data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']}"
            f" = {total}; expected the number of devices, {len(devices)} (set one axis to -1)"
        )
    return make_mesh(
        [sizes[name] for name in MESH_AXES], MESH_AXES, mesh_config.axis_types, devices=devices
    )


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of (possibly logically boxed) abstract values.

    Leaves without logical annotations are replicated, and so is any dimension whose size the
    mapped mesh axes do not divide (one KV head on a tensor axis of 2, say): such a dimension is
    too small to be worth splitting, and an uneven split would fail at `jit` time.
    """
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_tree), rules)
    shapes = nn.meta.unbox(abstract_tree)

    def fit(spec: PartitionSpec, leaf: Any) -> NamedSharding:
        dims = []
        padded = tuple(spec or ()) + (None,) * leaf.ndim
        for axis_size, names in zip(leaf.shape, padded, strict=False):
            shards = 1
            for name in _as_axes(names):
                shards *= mesh.shape[name]
            dims.append(names if axis_size % shards == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*dims))

    return jax.tree.map(
        fit, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their leading axis over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many blocks a batch's rows are split into on this mesh (the data-parallel axes)."""
    return math.prod(mesh.shape[name] for name in BATCH_AXES)


def table_row_shards(mesh: Mesh) -> int:
    """How many blocks each Engram table's rows are split into on this mesh."""
    count = 1
    for name in TABLE_ROW_AXES:
        count *= mesh.shape[name]
    return count


def table_lookup_fn(mesh: Mesh) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
    """The Engram lookup for this mesh: vocab-parallel when rows are split, else plain take."""
    if table_row_shards(mesh) == 1:
        return None
    return vocab_parallel_lookup(mesh, TABLE_ROW_AXES, batch_axes=("data",))


def global_batch(local_batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's numpy batch into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, value)
        for key, value in local_batch.items()
    }
