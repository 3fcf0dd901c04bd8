"""Engram tables built in row chunks: N(0, std) rows reproducible from a key and the row index,
filled into one preallocated buffer per shard, so building a table of S bytes needs S plus a chunk.

`jax.random.normal(key, (R, W))` on a whole table materialises its counters, random bits and
intermediates at full size (about 4x the table); here row `r` is `std * normal(fold_in(key, r),
(W,))`, so any row range (a shard, a host block) is generated on its own and every placement and
mesh sees the same values.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Rows generated per loop iteration: the transient working set is a few times this many rows.
CHUNK_ROWS = 16384
# Salt folded into the run's key before the per-table path hash, so tables never share a key
# with anything flax derives from the same seed.
_TABLE_KEY_SALT = 0x7AB1E


def table_key(rng: jax.Array, path: str) -> jax.Array:
    """The key of the table at `path` ("/"-joined parameter path): fold_in(salt, crc32(path))."""
    salted = jax.random.fold_in(rng, _TABLE_KEY_SALT)
    return jax.random.fold_in(salted, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _row_values(key, first_row, num_rows: int, width: int, std: float, dtype) -> jax.Array:
    """`[num_rows, width]` rows `first_row + i`: std * normal(fold_in(key, row), (width,))."""
    rows_X = first_row + jnp.arange(num_rows, dtype=jnp.uint32)  # [X] absolute row ids
    keys_X = jax.vmap(lambda r: jax.random.fold_in(key, r))(rows_X)
    values_XW = jax.vmap(lambda k: jax.random.normal(k, (width,), jnp.float32))(keys_X)
    return (std * values_XW).astype(dtype)


@partial(jax.jit, static_argnames=("num_rows", "width", "cols", "dtype", "chunk_rows"))
def _fill_rows(
    key: jax.Array,
    first_row: jax.Array,
    std: jax.Array,
    *,
    num_rows: int,
    width: int,
    cols: tuple[int, int],
    dtype: Any,
    chunk_rows: int,
) -> jax.Array:
    """Rows `[first_row, first_row + num_rows)`, columns `[cols[0], cols[1])` of the table."""
    chunk = min(chunk_rows, num_rows)
    num_chunks = -(-num_rows // chunk)
    c0, c1 = cols

    def body(i, buf_XW):
        # The last chunk overlaps its predecessor instead of running past the end: rows depend
        # only on their index, so the overlap rewrites identical values.
        start = jnp.minimum(i * chunk, num_rows - chunk)
        block_XW = _row_values(key, first_row + start.astype(jnp.uint32), chunk, width, std, dtype)
        return jax.lax.dynamic_update_slice(buf_XW, block_XW[:, c0:c1], (start, 0))

    # The loop carry is updated in place: peak is this buffer plus one chunk's intermediates.
    buf_XW = jnp.zeros((num_rows, c1 - c0), dtype)
    return jax.lax.fori_loop(0, num_chunks, body, buf_XW)


def _check_shape(shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{what}: table shape {shape}; expected [R, W] with R, W >= 1")
    if shape[0] >= 2**32:
        raise ValueError(f"{what}: {shape[0]} rows; expected < 2**32 (row ids are uint32)")


def init_table(
    key: jax.Array,
    shape: tuple[int, int],
    dtype: Any = jnp.float32,
    std: float = 1.0,
    sharding: jax.sharding.Sharding | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> jax.Array:
    """A `[R, W]` table of N(0, std^2) rows built shard by shard on its devices.

    Each addressable shard is filled in `chunk_rows` chunks inside one jitted loop on its own
    device, then the shards are assembled with `jax.make_array_from_single_device_arrays`: no
    device or host ever holds more than its shard plus one chunk. Values depend only on `key`
    and the row index, not on the sharding.

    Args:
      key: PRNG key of this table (e.g. `table_key(rng, path)`).
      shape: `(R, W)`.
      dtype: storage dtype (values are drawn in float32, then cast).
      std: standard deviation.
      sharding: target sharding; None = the default device.
      chunk_rows: rows per loop iteration.

    Returns:
      The table as a `jax.Array` with `sharding`.
    """
    shape = tuple(int(s) for s in shape)
    _check_shape(shape, "init_table")
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        rows = range(*index[0].indices(shape[0]))
        cols = range(*index[1].indices(shape[1]))
        with jax.default_device(device):
            shard_XW = _fill_rows(
                key,
                jnp.uint32(rows.start),
                jnp.float32(std),
                num_rows=len(rows),
                width=shape[1],
                cols=(cols.start, cols.stop),
                dtype=jnp.dtype(dtype),
                chunk_rows=chunk_rows,
            )
        arrays.append(jax.device_put(shard_XW, device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def init_host_table(
    key: jax.Array,
    shape: tuple[int, int],
    dtype: Any = np.float32,
    std: float = 1.0,
    block_rows: int = 1 << 18,
) -> np.ndarray:
    """The same values as `init_table`, in a numpy array filled `block_rows` rows at a time.

    The blocks are computed on the CPU backend; host memory peaks at the table plus one block.
    """
    shape = tuple(int(s) for s in shape)
    _check_shape(shape, "init_host_table")
    out_RW = np.empty(shape, np.dtype(dtype))
    cpu = jax.devices("cpu")[0]
    for start in range(0, shape[0], block_rows):
        n = min(block_rows, shape[0] - start)
        with jax.default_device(cpu):
            block_XW = _fill_rows(
                key,
                jnp.uint32(start),
                jnp.float32(std),
                num_rows=n,
                width=shape[1],
                cols=(0, shape[1]),
                dtype=jnp.dtype(dtype),
                chunk_rows=CHUNK_ROWS,
            )
        out_RW[start : start + n] = np.asarray(block_XW)
    return out_RW


def init_tables(
    rng: jax.Array,
    abstract_tables: Mapping[str, Any],
    shardings: Mapping[str, Any] | None,
    std: float,
) -> dict[str, Any]:
    """Every table of a nested memory tree (leaves: `jax.ShapeDtypeStruct`) built by `init_table`
    with the key `table_key(rng, "/"-joined path)`, into the matching leaf of `shardings`."""
    flat = traverse_util.flatten_dict(dict(abstract_tables), sep="/")
    flat_shardings = traverse_util.flatten_dict(dict(shardings), sep="/") if shardings else {}
    built = {
        path: init_table(
            table_key(rng, path), leaf.shape, leaf.dtype, std, flat_shardings.get(path)
        )
        for path, leaf in flat.items()
    }
    return traverse_util.unflatten_dict(built, sep="/") if built else {}


def init_host_tables(
    rng: jax.Array, abstract_tables: Mapping[str, Any], std: float
) -> dict[str, Any]:
    """`init_tables` for host RAM: every table as a numpy array (`init_host_table`, the same
    values as on a device), built one at a time, block by block."""
    flat = traverse_util.flatten_dict(dict(abstract_tables), sep="/")
    built = {
        path: init_host_table(table_key(rng, path), leaf.shape, leaf.dtype, std)
        for path, leaf in flat.items()
    }
    return traverse_util.unflatten_dict(built, sep="/") if built else {}
