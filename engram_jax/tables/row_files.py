"""Engram tables outside the accelerator for inference: host (numpy) and disk (flat row file)
readers with a bounded LRU row cache, read in row blocks from an orbax checkpoint's `memory` item.

Row file format (one per table, beside the checkpoints: `<workdir>/table_rows/<step>/`):
`<name>.rows` holds the `[R, W]` table as raw little-endian C-order rows (row r at byte offset
`r * W * itemsize`), and `<name>.json` its `{"shape": [R, W], "dtype": "float32", "step": N,
"source": "<leaf name in the memory item>"}`. The JSON is written last, after the rows file is
complete and renamed into place, so a row file with its JSON is always whole.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorstore as ts
from etils import epath

from engram_jax.tables import memory_item

# Rows read per block when converting or loading a table (a few MiB at W = 64).
BLOCK_ROWS = 1 << 16


def memory_array_name(path: Sequence[str]) -> str:
    """Name of a table's array inside the `memory` item (orbax joins tree keys with dots)."""
    return ".".join(["tables", *path])


def open_checkpoint_table(memory_dir: str | os.PathLike, path: Sequence[str]) -> ts.TensorStore:
    """Opens (without reading) the table at `path` (e.g. `("layer_1", "engram", "table")`) in an
    orbax `memory` item directory, as a read-only tensorstore array.

    Raises:
      FileNotFoundError: the item or the array does not exist (naming both).
    """
    memory_dir = epath.Path(memory_dir)
    name = memory_array_name(path)
    if (memory_dir / memory_item.INDEX_FILE).exists():
        return memory_item.open_leaf(memory_dir, name)
    # An older checkpoint: orbax's standard layout (zarr over OCDBT).
    metadata_file = memory_dir / "_METADATA"
    if not metadata_file.exists():
        raise FileNotFoundError(
            f"{memory_dir}: no orbax item metadata (_METADATA); expected the "
            "'memory' item of a committed checkpoint"
        )
    meta = json.loads(metadata_file.read_text())
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    if meta.get("use_ocdbt", True):
        kvstore = {"driver": "ocdbt", "base": _kvstore_url(memory_dir), "path": name + "/"}
    else:
        kvstore = _kvstore_url(memory_dir / name)
    try:
        return ts.open({"driver": driver, "kvstore": kvstore}, read=True).result()
    except ValueError as e:
        raise FileNotFoundError(f"{memory_dir}: cannot open table array {name!r}: {e}") from e


def _kvstore_url(path: epath.Path) -> str:
    text = os.fspath(path)
    return text if "://" in text else "file://" + os.path.abspath(text)


def iter_row_blocks(
    array: ts.TensorStore, block_rows: int = BLOCK_ROWS
) -> Iterator[tuple[int, np.ndarray]]:
    """`(first_row, rows [n, W])` over the array, block by block.

    Blocks are rounded to the stored chunk's rows, so no chunk is decoded twice.
    """
    num_rows = array.shape[0]
    try:
        chunk_shape = array.chunk_layout.read_chunk.shape
    except ValueError:
        chunk_shape = None
    # A virtual (stitched) view of several shards has no single chunk shape.
    chunk = chunk_shape[0] if chunk_shape and chunk_shape[0] else block_rows
    step = max(chunk, block_rows // chunk * chunk)
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        yield start, array[start:stop].read().result()


def load_host_table(array: ts.TensorStore, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """The whole table in a numpy array, filled block by block (peak: table + one block)."""
    out_RW = np.empty(array.shape, array.dtype.numpy_dtype)
    for start, block in iter_row_blocks(array, block_rows):
        out_RW[start : start + block.shape[0]] = block
    return out_RW


def write_row_file(
    array: ts.TensorStore, directory: str | os.PathLike, name: str, *, step: int, source: str
) -> str:
    """Converts a checkpoint table into a flat row file (see the module docstring), block by
    block; returns the `.rows` path. An existing complete row file is kept."""
    directory = os.fspath(directory)
    rows_path = os.path.join(directory, name + ".rows")
    meta_path = os.path.join(directory, name + ".json")
    if os.path.exists(meta_path) and os.path.exists(rows_path):
        return rows_path
    os.makedirs(directory, exist_ok=True)
    dtype = np.dtype(array.dtype.numpy_dtype).newbyteorder("<")
    tmp_path = f"{rows_path}.tmp{os.getpid()}"
    with open(tmp_path, "wb") as f:
        for _, block in iter_row_blocks(array):
            f.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
    os.replace(tmp_path, rows_path)
    meta = {"shape": list(array.shape), "dtype": dtype.name, "step": step, "source": source}
    with open(meta_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f)
    os.replace(meta_path + ".tmp", meta_path)
    return rows_path


class HostRows:
    """Rows of a numpy table in host RAM."""

    def __init__(self, table_RW: np.ndarray):
        self.table_RW = table_RW
        self.shape = table_RW.shape
        self.dtype = table_RW.dtype

    def read(self, rows_X: np.ndarray) -> np.ndarray:
        """`[X, W]` rows (numpy fancy indexing copies only those rows)."""
        return self.table_RW[rows_X]


class RowFile:
    """Rows of a flat row file read with `os.pread`, one call per row; `reads` counts rows read.

    Reads go through the OS page cache, not this process's memory; the row cache above bounds
    what this process holds. A call for several rows spreads them over up to `read_threads`
    threads (file reads release the GIL): a storage device serves concurrent random reads largely
    in parallel, where one thread pays every read's latency in turn (a token's 16 cold rows:
    `BENCHMARKS.md`). Rows in the page cache take microseconds either way; `read_threads=1`
    reads on the calling thread.
    """

    def __init__(self, rows_path: str, read_threads: int = 8):
        if read_threads < 1:
            raise ValueError(f"RowFile: read_threads={read_threads}; expected >= 1")
        meta_path = rows_path[: -len(".rows")] + ".json"
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["dtype"])
        self._row_bytes = self.shape[1] * self.dtype.itemsize
        expected = self.shape[0] * self._row_bytes
        size = os.path.getsize(rows_path)
        if size != expected:
            raise ValueError(
                f"{rows_path}: {size} bytes; expected {expected} for a {self.shape} "
                f"{self.dtype} table (delete it to convert the checkpoint table again)"
            )
        self.path = rows_path
        self._fd = os.open(rows_path, os.O_RDONLY)
        self._lock = threading.Lock()
        self._pool = None
        if read_threads > 1:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=read_threads, thread_name_prefix="engram-row-file"
            )
        self._threads = read_threads
        self.reads = 0

    def read(self, rows_X: np.ndarray) -> np.ndarray:
        if self._fd < 0:
            raise ValueError(f"{self.path}: row file is closed")
        rows_X = np.asarray(rows_X).reshape(-1)
        out_XW = np.empty((len(rows_X), self.shape[1]), self.dtype)
        view = memoryview(out_XW.reshape(-1).view(np.uint8))
        if self._pool is None or len(rows_X) < 2:
            self._read_into(view, rows_X, 0)
        else:
            # Contiguous slices of the request, one per thread.
            bounds = np.linspace(0, len(rows_X), min(self._threads, len(rows_X)) + 1).astype(int)
            jobs = [
                self._pool.submit(self._read_into, view, rows_X[a:b], a)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            for job in jobs:
                job.result()
        with self._lock:
            self.reads += len(rows_X)
        return out_XW

    def _read_into(self, view: memoryview, rows_X: np.ndarray, first: int) -> None:
        """Reads `rows_X` into rows `first, first + 1, ...` of the output buffer `view`."""
        size = self._row_bytes
        for i, row in enumerate(rows_X.tolist(), start=first):
            got = os.preadv(self._fd, [view[i * size : (i + 1) * size]], row * size)
            if got != size:
                raise OSError(f"short read of row {row} ({got} of {size} bytes)")

    def evict_page_cache(self) -> None:
        """Drops this file's pages from the OS page cache (`POSIX_FADV_DONTNEED`), so the next
        reads come from the storage device: how a cold start, or the long tail of a table larger
        than RAM, reads (a hypervisor's own cache below a VM may still serve them)."""
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Stops the read threads and closes the file (again: nothing to do)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RowCache:
    """LRU cache of table rows over several sources (one per Engram layer), bounded in bytes.

    `gather(layer, rows)` returns the requested rows in order; rows missing from the cache are
    read once per call (duplicates collapse) from `sources[layer]`. Counters: `requested` (unique
    rows asked for, per call), `hits`, `misses` (= rows read from the sources); a `HostRows`
    source without a cache is indexed directly and not counted.
    """

    def __init__(self, sources: Sequence[Any], capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"RowCache: capacity_bytes={capacity_bytes}; expected >= 0")
        self.sources = list(sources)
        self.capacity_bytes = int(capacity_bytes)
        self._rows: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.requested = self.hits = self.misses = 0

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        """Empties the cache (the counters are kept)."""
        with self._lock:
            self._rows.clear()
            self._bytes = 0

    def gather(self, layer: int, rows_X: np.ndarray) -> np.ndarray:
        """Rows `[..., W]` of table `layer` for flat row ids `rows_X` of any shape `[...]`."""
        rows_X = np.asarray(rows_X, np.int64)
        source = self.sources[layer]
        if self.capacity_bytes == 0 and isinstance(source, HostRows):
            # Rows in RAM, no cache: one fancy index reads a duplicate as cheaply as `np.unique`
            # finds it (which would triple the cost of a decode step's gather), and there are no
            # storage reads to count: the counters stay untouched.
            return source.table_RW[rows_X]
        unique_U, inverse_X = np.unique(rows_X.reshape(-1), return_inverse=True)
        width = source.shape[1]
        if self.capacity_bytes == 0:
            # No cache (row files): every unique row is read once, without per-row bookkeeping.
            with self._lock:
                self.requested += len(unique_U)
                self.misses += len(unique_U)
            return source.read(unique_U)[inverse_X].reshape(*rows_X.shape, width)
        out_UW = np.empty((len(unique_U), width), source.dtype)
        missing = []
        with self._lock:
            self.requested += len(unique_U)
            for i, row in enumerate(unique_U.tolist()):
                hit = self._rows.get((layer, row))
                if hit is None:
                    missing.append(i)
                else:
                    self._rows.move_to_end((layer, row))
                    out_UW[i] = hit
            self.hits += len(unique_U) - len(missing)
            self.misses += len(missing)
        if missing:
            read_MW = source.read(unique_U[missing])
            out_UW[missing] = read_MW
            with self._lock:
                for j, i in enumerate(missing):
                    self._insert((layer, int(unique_U[i])), read_MW[j].copy())
        return out_UW[inverse_X].reshape(*rows_X.shape, width)

    def _insert(self, key: tuple[int, int], row: np.ndarray) -> None:
        if row.nbytes > self.capacity_bytes or key in self._rows:
            return
        self._rows[key] = row
        self._bytes += row.nbytes
        while self._bytes > self.capacity_bytes:
            _, old = self._rows.popitem(last=False)
            self._bytes -= old.nbytes


class RowGatherer:
    """Gathers the rows of every Engram layer for a step through one `RowCache`.

    `submit(flat_ids)` takes `[B, L_e, T, M]` flat row ids and returns a `PendingRows` whose
    `result()` is the `[B, L_e, T, M, W]` rows, so a caller can dispatch device work between the
    two. With `threads=True` (row files) the layers' reads start at `submit`, concurrently in a
    small thread pool (file reads release the GIL). With `threads=False` (tables in host RAM) the
    reads run on the caller's thread inside `result()`: a numpy gather of a token's rows takes
    microseconds, less than handing it to a thread and back, and it still overlaps whatever the
    caller dispatched to the device before calling `result()` (JAX dispatch is asynchronous).
    """

    def __init__(self, cache: RowCache, threads: bool = True):
        self.cache = cache
        self._pool = None
        if threads:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, len(cache.sources)), thread_name_prefix="engram-rows"
            )

    @property
    def threaded(self) -> bool:
        """Whether reads run in worker threads from `submit` on (they can overlap device work
        dispatched before `result()` on any backend)."""
        return self._pool is not None

    def submit(self, flat_ids: np.ndarray) -> PendingRows:
        flat_ids = np.asarray(flat_ids)
        reads = [
            functools.partial(self.cache.gather, i, flat_ids[:, i])
            for i in range(flat_ids.shape[1])
        ]
        if self._pool is None:
            return PendingRows(reads)
        return PendingRows([self._pool.submit(read).result for read in reads])

    def gather(self, flat_ids: np.ndarray) -> np.ndarray:
        """Blocking `submit(...).result()`."""
        return self.submit(flat_ids).result()

    def close(self) -> None:
        """Stops the worker threads and closes the sources that hold files (`RowFile`)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for source in self.cache.sources:
            if hasattr(source, "close"):
                source.close()


class PendingRows:
    """The rows of a `RowGatherer.submit`: per layer, a call that returns its `[B, T, M, W]` rows
    (a thread's future's `result`, or the read itself), joined on the caller's thread (no join
    thread: a thread hop costs more than reading a token's few rows)."""

    def __init__(self, layers: list[Callable[[], np.ndarray]]):
        self._layers = layers

    def result(self) -> np.ndarray:
        """`[B, L_e, T, M, W]` rows (re-raises a failed read)."""
        return np.stack([layer() for layer in self._layers], axis=1)
