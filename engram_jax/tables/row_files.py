"""Engram tables outside the accelerator for inference: host (numpy) and disk (flat row file)
readers behind a bounded row cache, read in row blocks from a checkpoint's `memory` item, and
stored either as the checkpoint's floats or as packed FP8 rows (`tables/fp8.py`).

Row file format (one per table, beside the checkpoints: `<workdir>/table_rows/<step>/`):
- `<name>.rows`: the `[R, P]` stored table as raw little-endian C-order rows, row r at byte
  offset `r * row_bytes` (float rows: P = W values; FP8 rows: P = W + W/32 bytes, 264 at 256).
- `<name>.crc`: one little-endian uint32 CRC-32 per block of `check_rows` rows (the last block
  may be short).
- `<name>.json`: `{"format": "engram_jax.row_file", "version": 2, "shape": [R, P], "dtype":
  "float32" | "uint8", "encoding": "float" | "fp8", "row_width": W, "check_rows": 64,
  "fingerprint": "<hex>", "step": N, "source": "<leaf name>"}`. The fingerprint identifies the
  checkpoint table the rows came from (`table_fingerprint`): a row file whose fingerprint or
  encoding differs from the caller's is stale and is rebuilt. The JSON is written last, after the
  rows and checksums are complete and renamed into place, so a row file with its JSON is whole.

`RowFile` memory-maps the rows and reads a batch with one numpy gather per thread. Each block's
checksum is verified the first time a row of it is read, so a corrupted file is refused (naming
the file and the block) before any of its rows reach the model, without reading a large file
whole at startup.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import logging
import mmap
import os
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorstore as ts
from etils import epath

from engram_jax.tables import fp8, memory_item

logger = logging.getLogger(__name__)

# Rows read per block when converting or loading a table (a few MiB at W = 64).
BLOCK_ROWS = 1 << 16
# Rows per checksummed block of a row file: 16 KiB at 256 float32 bytes or 264 FP8 bytes per row,
# so verifying the block of one cold row reads a few pages, not megabytes.
CHECK_ROWS = 64
# Reads of at least this many rows are split over the reader's threads (page faults of cold rows
# overlap); smaller ones gather on the calling thread, where a thread hop costs more than the read.
THREADED_READ_ROWS = 256
ROW_FILE_FORMAT = "engram_jax.row_file"
ROW_FILE_VERSION = 2
ENCODINGS = ("float", "fp8")


class RowFileError(ValueError):
    """A row file that cannot be used as it is: incomplete, of another layout, or corrupted."""


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


def stored_encoding(array: Any) -> str:
    """ "fp8" for a table stored as packed FP8 rows (uint8, e.g. a converted release), else
    "float"."""
    return "fp8" if fp8.is_packed(_numpy_dtype(array)) else "float"


def _numpy_dtype(array: Any) -> np.dtype:
    dtype = array.dtype
    return np.dtype(getattr(dtype, "numpy_dtype", dtype))


def _encode_block(block: np.ndarray, encoding: str) -> np.ndarray:
    """A block of stored rows in `encoding` (float rows kept, or packed into FP8 rows)."""
    if fp8.is_packed(block.dtype):
        if encoding == "float":
            raise ValueError(
                "table_dtype: the checkpoint stores packed FP8 rows; expected 'fp8' (they are "
                "served as stored)"
            )
        return block
    return fp8.encode(block) if encoding == "fp8" else block


def stored_layout(array: Any, encoding: str) -> tuple[tuple[int, int], np.dtype]:
    """`([R, P], dtype)` of `array`'s rows stored in `encoding`."""
    num_rows, width = array.shape
    dtype = _numpy_dtype(array)
    if encoding == "fp8" and not fp8.is_packed(dtype):
        return (num_rows, fp8.packed_width(width)), np.dtype(np.uint8)
    return (num_rows, width), dtype


def load_host_table(
    array: ts.TensorStore, block_rows: int = BLOCK_ROWS, encoding: str | None = None
) -> np.ndarray:
    """The whole table in a numpy array, filled block by block (peak: table + one block); with
    `encoding="fp8"`, float rows are packed into FP8 rows block by block (None: as stored)."""
    encoding = encoding or stored_encoding(array)
    shape, dtype = stored_layout(array, encoding)
    out_RP = np.empty(shape, dtype)
    for start, block in iter_row_blocks(array, block_rows):
        out_RP[start : start + block.shape[0]] = _encode_block(block, encoding)
    return out_RP


def table_fingerprint(array: ts.TensorStore, context: str = "") -> str:
    """A short hex digest of a checkpoint table: `context` (the caller passes the checkpoint's
    metadata: config, data, step), shape, dtype and 9 evenly spaced rows. Trained tables of two
    runs differ in their rows; the metadata separates runs whose sampled rows could still agree
    (untouched rows keep their initial values). Reading the samples decodes at most 9 chunks."""
    digest = hashlib.sha256()
    digest.update(context.encode())
    digest.update(json.dumps([list(array.shape), str(_numpy_dtype(array))]).encode())
    num_rows = array.shape[0]
    for row in sorted(set(np.linspace(0, num_rows - 1, 9).astype(int).tolist())):
        digest.update(np.ascontiguousarray(array[row : row + 1].read().result()).tobytes())
    return digest.hexdigest()[:32]


def row_file_paths(directory: str | os.PathLike, name: str) -> tuple[str, str, str]:
    """`(<name>.rows, <name>.crc, <name>.json)` in `directory`."""
    base = os.path.join(os.fspath(directory), name)
    return base + ".rows", base + ".crc", base + ".json"


class RowFileWriter:
    """Writes a row file in blocks of any number of rows, checksumming each `CHECK_ROWS` block as
    it goes; `commit()` renames the rows and checksums into place and writes the JSON last. Holds
    at most one partial checksum block besides the caller's block."""

    def __init__(self, directory: str | os.PathLike, name: str, shape, dtype, **meta: Any):
        self.rows_path, self.crc_path, self.meta_path = row_file_paths(directory, name)
        os.makedirs(os.fspath(directory), exist_ok=True)
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.meta = meta
        self._block_bytes = CHECK_ROWS * self.shape[1] * self.dtype.itemsize
        self._tmp = f"{self.rows_path}.tmp{os.getpid()}"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed in commit)
        self._crcs: list[int] = []
        self._pending = b""  # bytes of the current, unfinished checksum block
        self.rows_written = 0

    def append(self, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, self.dtype)
        if data.ndim != 2 or data.shape[1] != self.shape[1]:
            raise ValueError(
                f"{self.rows_path}: appended rows of shape {data.shape}; expected [n, "
                f"{self.shape[1]}]"
            )
        raw = memoryview(data.reshape(-1).view(np.uint8))
        self._file.write(raw)
        self.rows_written += data.shape[0]
        view = memoryview(self._pending + raw.tobytes()) if self._pending else raw
        whole = len(view) // self._block_bytes * self._block_bytes
        for start in range(0, whole, self._block_bytes):
            self._crcs.append(zlib.crc32(view[start : start + self._block_bytes]))
        self._pending = bytes(view[whole:])

    def commit(self) -> str:
        """Finishes the file (flushed to the storage device, so the page cache can drop it and a
        crash cannot leave a JSON beside unwritten rows); returns the `.rows` path."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self.rows_written != self.shape[0]:
            os.remove(self._tmp)
            raise ValueError(
                f"{self.rows_path}: {self.rows_written} rows written; expected {self.shape[0]}"
            )
        if self._pending:
            self._crcs.append(zlib.crc32(self._pending))
        np.asarray(self._crcs, "<u4").tofile(self.crc_path + ".tmp")
        os.replace(self._tmp, self.rows_path)
        os.replace(self.crc_path + ".tmp", self.crc_path)
        meta = {
            "format": ROW_FILE_FORMAT,
            "version": ROW_FILE_VERSION,
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "check_rows": CHECK_ROWS,
            **self.meta,
        }
        with open(self.meta_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(meta, f)
        os.replace(self.meta_path + ".tmp", self.meta_path)
        return self.rows_path

    def abort(self) -> None:
        """Closes and removes the partial file."""
        self._file.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


def read_row_file_meta(rows_path: str) -> dict[str, Any] | None:
    """The JSON of a row file, or None when it is missing or not of this format and version."""
    meta_path = rows_path[: -len(".rows")] + ".json"
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if meta.get("format") != ROW_FILE_FORMAT or meta.get("version") != ROW_FILE_VERSION:
        return None
    return meta


def write_row_file(
    array: ts.TensorStore,
    directory: str | os.PathLike,
    name: str,
    *,
    step: int,
    source: str,
    fingerprint: str = "",
    encoding: str | None = None,
) -> str:
    """Converts a checkpoint table into a row file (see the module docstring), block by block;
    returns the `.rows` path. `encoding`: "float" keeps the stored floats, "fp8" packs FP8 rows
    (None: as stored). An existing row file of the same fingerprint and encoding is kept; one of
    another fingerprint or encoding (stale: another checkpoint at this step, or another table
    dtype) or an older format is rebuilt, with a warning naming it."""
    encoding = encoding or stored_encoding(array)
    if encoding not in ENCODINGS:
        raise ValueError(f"row file encoding: got {encoding!r}; expected one of {ENCODINGS}")
    rows_path = row_file_paths(directory, name)[0]
    meta = read_row_file_meta(rows_path)
    if meta is not None and os.path.exists(rows_path):
        if meta.get("fingerprint") == fingerprint and meta.get("encoding") == encoding:
            return rows_path
        logger.warning(
            "%s: row file of table %s (%s rows) is stale for table %s (%s rows); rebuilding it",
            rows_path,
            meta.get("fingerprint"),
            meta.get("encoding"),
            fingerprint,
            encoding,
        )
    elif os.path.exists(rows_path):
        logger.warning("%s: row file without a current JSON; rebuilding it", rows_path)
    shape, dtype = stored_layout(array, encoding)
    width = fp8.row_width(shape[1]) if encoding == "fp8" else shape[1]
    writer = RowFileWriter(
        directory,
        name,
        shape,
        dtype,
        encoding=encoding,
        row_width=width,
        fingerprint=fingerprint,
        step=step,
        source=source,
    )
    try:
        for _, block in iter_row_blocks(array):
            writer.append(_encode_block(block, encoding))
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def take_rows(table_RP: np.ndarray, rows_X: np.ndarray) -> np.ndarray:
    """`table[rows]` for row ids `[...]` of any shape -> `[..., P]`; negative ids (padding) read
    zero rows. The host row gather of both training (`HostTables`) and inference (`HostRows`)."""
    rows_X = np.asarray(rows_X)
    valid_X = rows_X >= 0
    if valid_X.all():
        return table_RP[rows_X]  # fancy indexing copies only those rows
    out_XP = np.zeros((*rows_X.shape, *table_RP.shape[1:]), table_RP.dtype)
    out_XP[valid_X] = table_RP[rows_X[valid_X]]
    return out_XP


class _Rows:
    """What the row sources share: the stored layout and the decode of gathered stored rows."""

    shape: tuple[int, int]  # stored [R, P]
    dtype: np.dtype  # stored dtype (uint8 for FP8 rows)
    encoding: str

    @property
    def row_width(self) -> int:
        """W: values per decoded row."""
        return fp8.row_width(self.shape[1]) if self.encoding == "fp8" else self.shape[1]

    @property
    def row_dtype(self) -> np.dtype:
        """dtype of decoded rows (float32 for FP8 rows)."""
        return np.dtype(np.float32) if self.encoding == "fp8" else np.dtype(self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row."""
        return self.shape[1] * np.dtype(self.dtype).itemsize

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored rows `[..., P]` -> rows `[..., W]` (FP8 rows dequantized)."""
        return fp8.decode(stored) if self.encoding == "fp8" else stored


class HostRows(_Rows):
    """Rows of a numpy table in host RAM: float rows, or packed FP8 rows (uint8)."""

    def __init__(self, table_RP: np.ndarray):
        self.table_RW = table_RP
        self.shape = table_RP.shape
        self.dtype = table_RP.dtype
        self.encoding = "fp8" if fp8.is_packed(table_RP.dtype) else "float"

    def read(self, rows_X: np.ndarray) -> np.ndarray:
        """`[X, P]` stored rows."""
        return take_rows(self.table_RW, rows_X)


class RowFile(_Rows):
    """Rows of a row file, memory-mapped; `reads` counts rows read, `verified_blocks` the
    checksum blocks verified so far.

    A read of several rows is one numpy gather from the mapping (no system call per row); reads of
    `THREADED_READ_ROWS` rows or more are split over up to `read_threads` threads: a row not in the
    OS page cache faults in from the storage device with the GIL released, and a device serves
    concurrent random reads largely in parallel. A decode step's few rows per layer are gathered on
    the calling thread (the layers themselves are read concurrently by `RowGatherer`).
    Mapped pages belong to the OS page cache and are reclaimable at any time; the row cache above
    bounds what this process itself holds. The mapping is advised random access, so a fault reads
    the pages it needs, not a readahead window.

    Before any row of a checksum block is returned, the block is checked against its CRC-32 (once
    per block and reader); a mismatch raises `RowFileError` naming the file and the block.

    Raises:
      RowFileError: the JSON is missing or of another format, the size does not match it, or the
        checksum file is missing or of the wrong length (each naming the file).
    """

    def __init__(self, rows_path: str, read_threads: int = 8):
        if read_threads < 1:
            raise ValueError(f"RowFile: read_threads={read_threads}; expected >= 1")
        meta = read_row_file_meta(rows_path)
        if meta is None:
            raise RowFileError(
                f"{rows_path}: no {ROW_FILE_FORMAT} version {ROW_FILE_VERSION} JSON beside it (an "
                "incomplete or older row file; delete it to convert the checkpoint table again)"
            )
        self.path, self.meta = rows_path, meta
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["dtype"])
        self.encoding = meta.get("encoding", "float")
        self.fingerprint = meta.get("fingerprint", "")
        self._check_rows = int(meta["check_rows"])
        size = os.path.getsize(rows_path)
        if size != self.shape[0] * self.row_bytes:
            raise RowFileError(
                f"{rows_path}: {size} bytes; expected {self.shape[0] * self.row_bytes} for a "
                f"{self.shape} {self.dtype} table (delete it to convert the checkpoint table again)"
            )
        crc_path = rows_path[: -len(".rows")] + ".crc"
        num_blocks = -(-self.shape[0] // self._check_rows)
        try:
            self._crcs = np.fromfile(crc_path, "<u4")
        except OSError as e:
            raise RowFileError(f"{crc_path}: cannot read the row file's checksums: {e}") from e
        if self._crcs.size != num_blocks:
            raise RowFileError(
                f"{crc_path}: {self._crcs.size} checksums; expected {num_blocks} (one per "
                f"{self._check_rows} rows; delete the row file to convert it again)"
            )
        self._verified = np.zeros(num_blocks, bool)
        self._fd = os.open(rows_path, os.O_RDONLY)
        self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        self._map.madvise(mmap.MADV_RANDOM)
        self._rows_RP = np.frombuffer(self._map, self.dtype).reshape(self.shape)  # [R, P]
        self._lock = threading.Lock()
        self._pool = None
        if read_threads > 1:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=read_threads, thread_name_prefix="engram-row-file"
            )
        self._threads = read_threads
        self.reads = 0

    @property
    def verified_blocks(self) -> int:
        return int(self._verified.sum())

    def read(self, rows_X: np.ndarray) -> np.ndarray:
        """`[X, P]` stored rows, in request order."""
        if self._fd < 0:
            raise ValueError(f"{self.path}: row file is closed")
        rows_X = np.asarray(rows_X, np.int64).reshape(-1)
        if rows_X.size and (rows_X.min() < 0 or rows_X.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: row ids outside [0, {self.shape[0]})")
        self._verify(np.unique(rows_X // self._check_rows))
        if self._pool is None or len(rows_X) < THREADED_READ_ROWS:
            # A decode step's few rows: one gather on this thread (about 11 us for 16 warm rows,
            # against 100-180 us through the pool: BENCHMARKS.md).
            out_XP = self._rows_RP[rows_X]
        else:
            # Contiguous slices of the request, one gather per thread (their page faults overlap).
            bounds = np.linspace(0, len(rows_X), self._threads + 1).astype(int)
            parts = [
                self._pool.submit(np.take, self._rows_RP, rows_X[a:b], 0)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            out_XP = np.concatenate([part.result() for part in parts])
        with self._lock:
            self.reads += len(rows_X)
        return out_XP

    def _verify(self, blocks: np.ndarray) -> None:
        """Checks the not yet verified checksum `blocks` against their CRC-32s."""
        todo = blocks[~self._verified[blocks]]
        if todo.size == 0:
            return
        if self._pool is None or todo.size < 2:
            oks = [self._block_ok(b) for b in todo.tolist()]
        else:
            oks = list(self._pool.map(self._block_ok, todo.tolist()))
        bad = todo[~np.asarray(oks, bool)]
        if bad.size:
            first = int(bad[0]) * self._check_rows
            last = min(first + self._check_rows, self.shape[0]) - 1
            raise RowFileError(
                f"{self.path}: {bad.size} block(s) fail their CRC-32 checksum, the first block "
                f"{int(bad[0])} (rows {first}-{last}): the row file is corrupted; delete it to "
                "convert the checkpoint table again"
            )
        self._verified[todo] = True

    def _block_ok(self, block: int) -> bool:
        start = block * self._check_rows * self.row_bytes
        stop = min(start + self._check_rows * self.row_bytes, self.shape[0] * self.row_bytes)
        return zlib.crc32(self._map[start:stop]) == int(self._crcs[block])

    def verify_all(self) -> None:
        """Checks every block (reads the whole file); raises `RowFileError` on a mismatch."""
        self._verify(np.arange(self._verified.size))

    def evict_page_cache(self) -> None:
        """Drops this file's pages from this process's mapping and from the OS page cache
        (`MADV_DONTNEED`, `POSIX_FADV_DONTNEED`), so the next reads come from the storage device:
        how a cold start, or the long tail of a table larger than RAM, reads (a hypervisor's own
        cache below a VM may still serve them)."""
        self._map.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Stops the read threads, unmaps and closes the file (again: nothing to do)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._fd >= 0:
            self._rows_RP = None  # the mapping cannot close while an array views it
            self._map.close()
            os.close(self._fd)
            self._fd = -1


class RowCache:
    """A set-associative LRU cache of stored rows over several sources (one per Engram layer),
    bounded in bytes: one preallocated slab of `capacity_bytes // row_bytes` rows plus a 16-byte
    index entry per row (its key and last use), so the process holds about the configured bytes
    (tests/test_table_store.py measures peak RSS), never a Python object per row. The slab's pages
    are committed as rows fill it.

    Row `r` of layer `l` can only live in the `WAYS` slots of its set (`set_of`, a hash of the
    key); a miss replaces the least recently used row of that set. `gather(layer, rows)` returns
    the decoded rows in order; rows missing from the cache are read once per call (duplicates
    collapse) from `sources[layer]`. Counters: `requested` (unique rows asked for, per call),
    `hits`, `misses` (= rows read from the sources); a `HostRows` source without a cache is indexed
    directly and not counted. The sources must store rows alike (width, dtype, encoding).
    """

    WAYS = 8

    def __init__(self, sources: Sequence[Any], capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"RowCache: capacity_bytes={capacity_bytes}; expected >= 0")
        self.sources = list(sources)
        layouts = {(s.shape[1], np.dtype(s.dtype).name, s.encoding) for s in self.sources}
        if len(layouts) != 1:
            raise ValueError(
                f"RowCache: sources store rows as {sorted(layouts)}; expected one layout"
            )
        self.capacity_bytes = int(capacity_bytes)
        first = self.sources[0]
        capacity_rows = self.capacity_bytes // first.row_bytes
        self._ways = min(self.WAYS, capacity_rows)
        self._sets = capacity_rows // self._ways if self._ways else 0
        slots = self._sets * self._ways
        self._slab_NP = np.empty((slots, first.shape[1]), first.dtype)  # [slots, P]
        self._keys_SW = np.full((self._sets, self._ways), -1, np.int64)  # [sets, ways]
        self._used_SW = np.zeros((self._sets, self._ways), np.int64)  # last use (a clock)
        self._clock = 0
        self._lock = threading.Lock()
        self.requested = self.hits = self.misses = 0

    @property
    def cached_bytes(self) -> int:
        return int((self._keys_SW >= 0).sum()) * self.sources[0].row_bytes

    @property
    def row_dtype(self) -> np.dtype:
        """dtype of gathered (decoded) rows."""
        return self.sources[0].row_dtype

    def clear(self) -> None:
        """Empties the cache (the counters are kept)."""
        with self._lock:
            self._keys_SW[:] = -1
            self._used_SW[:] = 0

    def set_of(self, layer: int, rows_X: np.ndarray) -> np.ndarray:
        """The set each row of table `layer` lives in (a multiplicative hash of its key)."""
        keys = np.asarray(rows_X, np.int64) * len(self.sources) + layer
        mixed = keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return ((mixed >> np.uint64(29)) % np.uint64(max(self._sets, 1))).astype(np.int64)

    def gather(self, layer: int, rows_X: np.ndarray) -> np.ndarray:
        """Rows `[..., W]` of table `layer` for flat row ids `rows_X` of any shape `[...]`."""
        rows_X = np.asarray(rows_X, np.int64)
        source = self.sources[layer]
        if self.capacity_bytes == 0 and isinstance(source, HostRows):
            # Rows in RAM, no cache: one fancy index reads a duplicate as cheaply as `np.unique`
            # finds it (which would triple the cost of a decode step's gather), and there are no
            # storage reads to count: the counters stay untouched.
            return source.decode(take_rows(source.table_RW, rows_X))
        unique_U, inverse_X = np.unique(rows_X.reshape(-1), return_inverse=True)
        if self._sets == 0:
            # No cache: every unique row is read once, without bookkeeping.
            with self._lock:
                self.requested += len(unique_U)
                self.misses += len(unique_U)
            stored_UP = source.read(unique_U)
        else:
            stored_UP = self._cached_read(layer, source, unique_U)
        rows_UW = source.decode(stored_UP)
        return rows_UW[inverse_X].reshape(*rows_X.shape, rows_UW.shape[-1])

    def _cached_read(self, layer: int, source: Any, unique_U: np.ndarray) -> np.ndarray:
        """Stored rows `[U, P]` of sorted distinct ids: hits copied from the slab, misses read and
        inserted. Each row of a call gets its own use time, hits first and then misses, each in
        ascending id order: the order in which a set's least recently used row is chosen."""
        keys_U = unique_U * len(self.sources) + layer
        sets_U = self.set_of(layer, unique_U)
        with self._lock:
            match_UW = self._keys_SW[sets_U] == keys_U[:, None]  # [U, ways]
            hit_U = match_UW.any(axis=1)
            hit_sets, hit_ways = sets_U[hit_U], match_UW[hit_U].argmax(axis=1)
            out_UP = np.empty((len(unique_U), self._slab_NP.shape[1]), self._slab_NP.dtype)
            out_UP[hit_U] = self._slab_NP[hit_sets * self._ways + hit_ways]
            self._used_SW[hit_sets, hit_ways] = self._clock + np.arange(hit_sets.size)
            self._clock += hit_sets.size
            self.requested += len(unique_U)
            self.hits += hit_sets.size
            self.misses += len(unique_U) - hit_sets.size
        missing = np.flatnonzero(~hit_U)
        if missing.size == 0:
            return out_UP
        read_MP = source.read(unique_U[missing])
        out_UP[missing] = read_MP
        with self._lock:
            for j, i in enumerate(missing.tolist()):
                s, key = int(sets_U[i]), keys_U[i]
                if (self._keys_SW[s] == key).any():
                    continue  # inserted meanwhile by another call
                # The least recently used way; empty ways (key -1, use 0) come first.
                way = int(np.argmin(np.where(self._keys_SW[s] < 0, -1, self._used_SW[s])))
                self._keys_SW[s, way] = key
                self._used_SW[s, way] = self._clock
                self._clock += 1
                self._slab_NP[s * self._ways + way] = read_MP[j]
        return out_UP


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
