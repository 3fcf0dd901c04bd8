"""The checkpoint's `memory` item (Engram tables and their optimizer state) written and read in row
blocks, so saving or restoring a table of S bytes needs S plus a block, not 2-3x S.

orbax's array handlers copy a whole shard to host memory before writing (and encode it as one
chunk by default); for tables of many GiB that doubles or triples the process's memory. Here every
process writes the shards it owns (replica 0 only) straight from the live arrays, `block_rows` rows
at a time, each as a zarr3 array, and restores read the rows each target shard needs, block by
block, into one preallocated buffer per device (numpy targets are filled in place).

Layout of `<step>/memory/`:
- `index.json` (process 0): `{"format": "engram_jax.row_blocks", "version": 1, "leaves":
  {name: {"shape": [...], "dtype": "float32"} | {"scalar": value, "dtype": "int32"}}}`; `name` is
  the tree path joined with dots (`tables.layer_1.engram.table`, `opt_state.0.mu.layer_1...`).
- `<name>/shard_<r0>-<r1>_<c0>-<c1>/`: a zarr3 array holding the leaf's box `[r0:r1, c0:c1]`
  (one such piece per distinct shard; together they tile the leaf).
A `memory` directory written by orbax's standard handler (older checkpoints) is still restored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

FORMAT = "engram_jax.row_blocks"
VERSION = 1
INDEX_FILE = "index.json"
# Rows per written/read block: 16 MiB at W = 64 in float32.
BLOCK_ROWS = 1 << 16
_PIECE = re.compile(r"^shard_(\d+-\d+(?:_\d+-\d+)*)$")


def leaf_name(path: tuple[Any, ...]) -> str:
    """Dotted name of a tree path (dict keys, sequence indices, attribute names)."""
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts)


def _kvstore(path: epath.Path) -> dict[str, Any] | str:
    text = os.fspath(path)
    return text if "://" in text else {"driver": "file", "path": os.path.abspath(text)}


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _piece_name(box: tuple[tuple[int, int], ...]) -> str:
    return "shard_" + "_".join(f"{a}-{b}" for a, b in box)


# ------------------------------------------------------------------------------------------------
# Writing.
# ------------------------------------------------------------------------------------------------


def _write_piece(directory: epath.Path, data: Any, box, block_rows: int) -> None:
    """Writes one shard (`jax.Array` on one device, or numpy) as a zarr3 array, block by block."""
    shape = [b - a for a, b in box]
    chunk = [min(block_rows, shape[0]), *shape[1:]]
    spec = {
        "driver": "zarr3",
        "kvstore": _kvstore(directory / _piece_name(box)),
        "metadata": {
            "shape": shape,
            "data_type": np.dtype(data.dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "zstd", "configuration": {"level": 1}},
            ],
        },
        "create": True,
        "delete_existing": True,
    }
    array = ts.open(spec).result()
    for start in range(0, shape[0], block_rows):
        stop = min(start + block_rows, shape[0])
        # One block on the host at a time (a device slice, then its transfer).
        array[start:stop].write(np.asarray(data[start:stop])).result()


def save_memory(directory: epath.Path, tree: Any, block_rows: int = BLOCK_ROWS) -> None:
    """Writes `tree` (jax or numpy array leaves) into `directory`; every process writes its own
    replica-0 shards, process 0 the index and the numpy and scalar leaves."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    primary = jax.process_index() == 0
    index: dict[str, Any] = {}
    for path, leaf in leaves:
        name = leaf_name(path)
        dtype = np.dtype(leaf.dtype)
        if np.ndim(leaf) == 0:
            index[name] = {"scalar": np.asarray(leaf).item(), "dtype": dtype.name}
            continue
        shape = tuple(int(n) for n in np.shape(leaf))
        index[name] = {"shape": list(shape), "dtype": dtype.name}
        leaf_dir = directory / name
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                if shard.replica_id == 0:
                    _write_piece(leaf_dir, shard.data, _box(shard.index, shape), block_rows)
        elif primary:
            _write_piece(leaf_dir, np.asarray(leaf), tuple((0, n) for n in shape), block_rows)
    if primary:
        (directory / INDEX_FILE).write_text(
            json.dumps({"format": FORMAT, "version": VERSION, "leaves": index}, indent=1)
        )


# ------------------------------------------------------------------------------------------------
# Reading.
# ------------------------------------------------------------------------------------------------


def _pieces(leaf_dir: epath.Path) -> list[tuple[tuple[tuple[int, int], ...], epath.Path]]:
    found = []
    for entry in leaf_dir.iterdir() if leaf_dir.exists() else []:
        match = _PIECE.match(entry.name)
        if match:
            box = tuple(tuple(int(v) for v in d.split("-")) for d in match.group(1).split("_"))
            found.append((box, entry))
    return sorted(found)


def open_leaf(directory: epath.Path, name: str) -> ts.TensorStore:
    """The saved leaf `name` as one (virtual) read-only tensorstore array, without reading it."""
    leaf_dir = epath.Path(directory) / name
    pieces = _pieces(leaf_dir)
    if not pieces:
        raise FileNotFoundError(f"{leaf_dir}: no saved shards of leaf {name!r}")
    opened = [
        (box, ts.open({"driver": "zarr3", "kvstore": _kvstore(path)}, read=True).result())
        for box, path in pieces
    ]
    rank = len(opened[0][0])
    # Pieces tile the leaf: translate each to its box origin and stitch along every axis.
    views = [arr[ts.d[:].translate_to[[a for a, _ in box]]] for box, arr in opened]
    for axis in reversed(range(rank)):
        views = _stitch(views, axis)
    if len(views) != 1:
        raise ValueError(f"{leaf_dir}: saved shards do not tile the leaf {name!r}")
    return views[0]


def _stitch(views: list[ts.TensorStore], axis: int) -> list[ts.TensorStore]:
    """Concatenates views that differ only in their `axis` range (same range on other axes)."""
    groups: dict[tuple, list[ts.TensorStore]] = {}
    for view in views:
        key = tuple(
            (view.domain[d].inclusive_min, view.domain[d].exclusive_max)
            for d in range(view.rank)
            if d != axis
        )
        groups.setdefault(key, []).append(view)
    stitched = []
    for group in groups.values():
        group.sort(key=lambda v: v.domain[axis].inclusive_min)
        stitched.append(group[0] if len(group) == 1 else ts.concat(group, axis=axis))
    return stitched


def _row_blocks(source: ts.TensorStore, box, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """`(offset, block)` of the box `[r0:r1, ...]` read `block_rows` rows at a time."""
    (r0, r1), rest = box[0], box[1:]
    for start in range(r0, r1, block_rows):
        stop = min(start + block_rows, r1)
        index = (slice(start, stop), *(slice(a, b) for a, b in rest))
        yield start - r0, source[index].read().result()


@partial(jax.jit, donate_argnums=0)
def _put_rows(buf: jax.Array, block: jax.Array, offset: jax.Array) -> jax.Array:
    # Donated: the block lands in place, the shard is never copied.
    starts = (offset,) + (0,) * (buf.ndim - 1)
    return jax.lax.dynamic_update_slice(buf, block.astype(buf.dtype), starts)


def _restore_leaf(directory: epath.Path, name: str, info: dict, target: Any, block_rows: int):
    if "scalar" in info:
        value = np.asarray(info["scalar"], info["dtype"])
        if isinstance(target, np.ndarray):
            return value.astype(target.dtype)
        sharding = getattr(target, "sharding", None)
        dtype = getattr(target, "dtype", value.dtype)
        return jax.device_put(value.astype(dtype), sharding)
    shape = tuple(info["shape"])
    if tuple(np.shape(target)) != shape:
        raise ValueError(f"leaf {name!r}: saved shape {shape}, target shape {np.shape(target)}")
    source = open_leaf(directory, name)
    full = tuple((0, n) for n in shape)
    if isinstance(target, np.ndarray):
        for offset, block in _row_blocks(source, full, block_rows):
            target[offset : offset + block.shape[0]] = block
        return target
    sharding = getattr(target, "sharding", None) or jax.sharding.SingleDeviceSharding(
        jax.devices()[0]
    )
    dtype = jnp.dtype(target.dtype)
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        box = _box(index, shape)
        with jax.default_device(device):
            buf = jnp.zeros([b - a for a, b in box], dtype)
            for offset, block in _row_blocks(source, box, block_rows):
                buf = _put_rows(buf, jax.device_put(block, device), jnp.int32(offset))
        arrays.append(buf)
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def restore_memory(
    directory: epath.Path, target: Any, block_rows: int = BLOCK_ROWS, *, partial: bool = False
) -> Any:
    """Restores the tree `target` describes (`jax.ShapeDtypeStruct` leaves with shardings, or
    numpy arrays filled in place); structure and shapes must match the saved ones exactly, or,
    with `partial=True`, `target` may name a subset of the saved leaves (e.g. the tables without
    their optimizer state, for inference)."""
    meta = json.loads((directory / INDEX_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{directory / INDEX_FILE}: format {meta.get('format')!r} version "
            f"{meta.get('version')}; expected {FORMAT!r} version {VERSION}"
        )
    saved = meta["leaves"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    names = [leaf_name(path) for path, _ in leaves]
    for name, (_, leaf) in zip(names, leaves, strict=True):
        # Packed FP8 rows (uint8, tables/fp8.py; e.g. a converted release) are inference-only.
        if saved.get(name, {}).get("dtype") == "uint8" and jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(
                f"{directory}: leaf {name!r} holds packed FP8 table rows, which serve inference "
                "(generate) only; training needs float32 or bfloat16 tables"
            )
    if set(names) - set(saved) or (not partial and set(saved) - set(names)):
        missing, extra = sorted(set(saved) - set(names)), sorted(set(names) - set(saved))
        raise ValueError(
            f"{directory}: saved leaves differ from the target (saved only: {missing}; target "
            f"only: {extra})"
        )
    restored = [
        _restore_leaf(directory, name, saved[name], leaf, block_rows)
        for name, (_, leaf) in zip(names, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, restored)


def _numpy_target(directory: epath.Path) -> dict[str, Any]:
    """Without a target: numpy leaves in nested dicts keyed by the saved names' dotted parts
    (sequence indices become string keys), like orbax's target-less restore of a dict tree."""
    saved = json.loads((directory / INDEX_FILE).read_text())["leaves"]
    tree: dict[str, Any] = {}
    for name, info in saved.items():
        *parents, last = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        if "scalar" in info:
            node[last] = np.zeros((), info["dtype"])
        else:
            node[last] = np.empty(info["shape"], info["dtype"])
    return tree


# ------------------------------------------------------------------------------------------------
# orbax handler.
# ------------------------------------------------------------------------------------------------


class MemoryHandler(ocp.CheckpointHandler):
    """orbax handler of the `memory` item: a synchronous, row-block save from the live arrays
    (so the caller may donate them once `save` returns, with no host snapshot) and a row-block
    restore; a directory in orbax's standard layout is restored by orbax's handler."""

    def __init__(self, block_rows: int = BLOCK_ROWS):
        self._block_rows = block_rows

    def save(self, directory: epath.Path, args: MemorySave) -> None:
        save_memory(epath.Path(directory), args.item, self._block_rows)

    def restore(self, directory: epath.Path, args: MemoryRestore | None = None) -> Any:
        directory = epath.Path(directory)
        target = None if args is None else args.item
        if not (directory / INDEX_FILE).exists():
            return ocp.StandardCheckpointHandler().restore(
                directory, args=ocp.args.StandardRestore(target)
            )
        if target is None:
            target = _numpy_target(directory)
        return restore_memory(directory, target, self._block_rows)


@ocp.args.register_with_handler(MemoryHandler, for_save=True)
@dataclasses.dataclass
class MemorySave(ocp.args.CheckpointArgs):
    """Save args of the `memory` item."""

    item: Any


@ocp.args.register_with_handler(MemoryHandler, for_restore=True)
@dataclasses.dataclass
class MemoryRestore(ocp.args.CheckpointArgs):
    """Restore args of the `memory` item: the target tree."""

    item: Any = None
