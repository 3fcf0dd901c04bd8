"""Corpus files at scale: listing, per-process shards, streaming readers and a cheap fingerprint.

A corpus is a sorted list of files. Each process reads only its own shard of it, lazily:

  * With at least as many files as processes, process i reads whole files `files[i::count]`.
  * With fewer files, every file is cut into `count` parts and process i reads part i of each:
    a row range for Parquet, a byte range for uncompressed JSONL (a line belongs to the part
    holding its first byte), a record range for ArrayRecord, and every count-th document for
    `.txt` and gzip files (which have no random access: each process decompresses the whole
    file and keeps its own documents).

Readers stream: Parquet one row group at a time, JSONL one line at a time, text in 1 MiB chunks.
Every document carries a `key` (its row, line-start byte or document index in the file) that
fixes its train/eval side without knowing the corpus size (`is_eval_document`) and a resume
point, so a grain iterator over the stream (`DocumentStream`) restarts exactly where it stopped.
Paths may be URLs (`gs://...`): non-local files are opened through etils.epath.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import fnmatch
import glob
import gzip
import hashlib
import importlib.resources
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import grain
import numpy as np

from engram_jax import storage
from engram_jax.cli import describe_path

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (
    ".txt",
    ".txt.gz",
    ".jsonl",
    ".jsonl.gz",
    ".parquet",
    ".arrayrecord",
    ".array_record",
)
BUNDLED_CORPUS = "python_docs_slice.txt.gz"

# Two or more blank lines end a document in .txt files; one blank line is a paragraph break.
_DOCUMENT_SEPARATOR = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_GLOB_CHARS = re.compile(r"[*?\[]")
_TEXT_CHUNK_CHARS = 1 << 20
_FINGERPRINT_VERSION = "engram_jax-corpus-v1"
_FINGERPRINT_SAMPLE_FILES = 16  # files whose head and tail bytes enter the fingerprint
_FINGERPRINT_SAMPLE_BYTES = 1 << 16  # bytes read from each end of a sampled file


def bundled_corpus_path() -> str:
    """Path of the bundled Python-docs slice (see assets/LICENSE_CORPUS.md)."""
    return str(importlib.resources.files("engram_jax") / "assets" / BUNDLED_CORPUS)


def is_url(path: str) -> bool:
    return "://" in path


def extension(path: str) -> str:
    """The supported extension `path` ends with; ValueError otherwise."""
    lower = path.lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return ext
    raise ValueError(
        f"data_path: unsupported file {path!r}; expected one of {', '.join(SUPPORTED_EXTENSIONS)}"
    )


def _open_binary(path: str):
    if is_url(path):
        from etils import epath

        return epath.Path(path).open("rb")
    return open(path, "rb")


@contextlib.contextmanager
def _open_text(path: str) -> Iterator[TextIO]:
    """A possibly gzip-compressed UTF-8 file as text (universal newlines, as `open` gives); bad
    bytes or a broken gzip stream met while the caller reads become a ValueError naming the file
    (and the byte offset)."""
    compressed = path.lower().endswith(".gz")
    raw = _open_binary(path)
    if compressed:
        raw = gzip.GzipFile(fileobj=raw, mode="rb")
    with io.TextIOWrapper(raw, encoding="utf-8") as f:
        try:
            yield f
        except UnicodeDecodeError as e:
            raise ValueError(_utf8_error_message(path, compressed)) from e
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise ValueError(_gzip_error_message(path, e)) from e


@contextlib.contextmanager
def _gzip_errors(path: str) -> Iterator[None]:
    """A broken gzip stream met inside the block becomes a ValueError naming the file."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(_gzip_error_message(path, e)) from e


def _gzip_error_message(path: str, error: Exception) -> str:
    return (
        f"{path}: not a readable gzip file ({type(error).__name__}: {error}); expected "
        "gzip-compressed text for a name ending in .gz"
    )


def _utf8_error_message(path: str, compressed: bool) -> str:
    """Finds the first invalid UTF-8 byte by re-reading the file (the text decoder's own offset
    is relative to its read chunk)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes fed to the decoder before `chunk`
    with _open_binary(path) as raw:
        head = raw.read(2)
        raw.seek(0)
        f = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        while chunk := f.read(1 << 20):
            buffered = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                position = offset - buffered + e.start
                where = "of the decompressed data " if compressed else ""
                hint = (
                    " (the file looks gzip-compressed: name it .gz)"
                    if head == b"\x1f\x8b" and not compressed
                    else ""
                )
                return (
                    f"{path}: invalid UTF-8 at byte offset {position} {where}"
                    f"(byte 0x{e.object[e.start]:02x}: {e.reason}); expected UTF-8 text{hint}"
                )
            offset += len(chunk)
    return f"{path}: invalid UTF-8 (truncated multi-byte sequence at the end); expected UTF-8 text"


def _file_size(path: str) -> int:
    if is_url(path):
        from etils import epath

        return int(epath.Path(path).stat().length)
    return os.path.getsize(path)


# ---------------------------------------------------------------------------------------- listing


def _glob_match(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether path segments match glob segments; `**` matches zero or more segments."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], pattern[0])
        and _glob_match(parts[1:], pattern[1:])
    )


def _list_url(data_path: str) -> list[str]:
    from etils import epath

    if _GLOB_CHARS.search(data_path):
        scheme, rest = data_path.split("://", 1)
        parts = rest.split("/")
        first = next(i for i, p in enumerate(parts) if _GLOB_CHARS.search(p))
        base = f"{scheme}://" + "/".join(parts[:first])
        pattern = parts[first:]
        if "**" in pattern:
            # epath refuses `**` on GCS (it would list every directory below the root): walk
            # the tree below the glob's fixed prefix once and match the rest here.
            files = [
                f
                for f in (storage.walk_files(base) if storage.isdir(base) else [])
                if _glob_match(f[len(base) :].lstrip("/").split("/"), pattern)
            ]
        else:
            files = sorted(str(p) for p in epath.Path(base).glob("/".join(pattern)) if p.is_file())
        if not files:
            raise FileNotFoundError(f"data_path={data_path!r}: the glob matches no files")
        return files
    path = epath.Path(data_path)
    if path.is_dir():
        # storage.walk_files, not rglob: epath refuses recursive globs on GCS.
        files = []
        for f in storage.walk_files(data_path):
            if any(f.lower().endswith(ext) for ext in SUPPORTED_EXTENSIONS):
                files.append(f)
            else:
                logger.info("data_path: skipping %s (unsupported extension)", f)
        if not files:
            raise ValueError(
                f"data_path={data_path!r}: the directory holds no file ending in "
                f"{', '.join(SUPPORTED_EXTENSIONS)}"
            )
        return files
    if path.exists():
        return [data_path]
    raise FileNotFoundError(f"data_path={data_path!r}: no such file or directory")


def list_files(data_path: str, key: str = "data_path") -> list[str]:
    """Resolves "" (the bundled corpus), a file, a glob (`**` recurses) or a directory (every
    file with a supported extension below it) to a sorted list of files; URLs go through epath.
    Errors name the config `key` that holds the path (data_path or eval_data_path) and, for a
    local path that is not a regular file, what it is (a FIFO is never opened)."""
    if data_path == "":
        return [bundled_corpus_path()]
    try:
        files = _list_files(data_path)
    except (OSError, ValueError) as e:
        if key == "data_path":
            raise
        raise type(e)(str(e).replace("data_path=", f"{key}=", 1)) from e
    for path in files:
        if not is_url(path) and not os.path.isfile(path):
            raise ValueError(
                f"{key}={data_path!r}: {path!r} is {describe_path(path)}; expected regular "
                "corpus files"
            )
        extension(path)  # fail early on an unsupported file named explicitly or by a glob
    return files


def _list_files(data_path: str) -> list[str]:
    if is_url(data_path):
        files = _list_url(data_path)
    elif _GLOB_CHARS.search(data_path):
        files = sorted(p for p in glob.glob(data_path, recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"data_path={data_path!r}: the glob matches no files")
    elif os.path.isdir(data_path):
        files = []
        for root, _, names in os.walk(data_path):
            for name in names:
                path = os.path.join(root, name)
                if any(name.lower().endswith(ext) for ext in SUPPORTED_EXTENSIONS):
                    files.append(path)
                else:
                    logger.info("data_path: skipping %s (unsupported extension)", path)
        if not files:
            raise ValueError(
                f"data_path={data_path!r}: the directory holds no file ending in "
                f"{', '.join(SUPPORTED_EXTENSIONS)}"
            )
        files.sort()
    elif os.path.isfile(data_path):
        files = [data_path]
    elif os.path.lexists(data_path):
        raise ValueError(
            f"data_path={data_path!r}: {describe_path(data_path)}; expected a corpus file, a "
            "directory of them or a glob"
        )
    else:
        raise FileNotFoundError(f"data_path={data_path!r}: no such file or directory")
    return files


def _relative_names(files: Sequence[str]) -> list[str]:
    """File names relative to their common directory: moving a corpus keeps its fingerprint."""
    if len(files) == 1:
        return [files[0].rsplit("/", 1)[-1]]
    common = os.path.commonpath(list(files))
    return [os.path.relpath(f, common) for f in files]


def _evenly_spaced(total: int, count: int) -> list[int]:
    """Up to `count` indices spread evenly over [0, total), first and last included."""
    count = min(total, count)
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})


def corpus_fingerprint(files: Sequence[str]) -> str:
    """Hex digest of the corpus: relative file names, sizes, and the first and last 64 KiB of up
    to 16 evenly spaced files. Reads at most ~2 MiB whatever the corpus size; a change inside a
    large file that keeps its size and both ends is not detected."""
    digest = hashlib.sha256(f"{_FINGERPRINT_VERSION}\n{len(files)}\n".encode())
    sizes = [_file_size(f) for f in files]
    for name, size in zip(_relative_names(files), sizes, strict=True):
        digest.update(f"{name}\0{size}\n".encode())
    for index in _evenly_spaced(len(files), _FINGERPRINT_SAMPLE_FILES):
        with _open_binary(files[index]) as f:
            digest.update(f.read(_FINGERPRINT_SAMPLE_BYTES))
            if sizes[index] > 2 * _FINGERPRINT_SAMPLE_BYTES:
                f.seek(sizes[index] - _FINGERPRINT_SAMPLE_BYTES)
                digest.update(f.read(_FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()[:24]


# ---------------------------------------------------------------------------------------- pieces


@dataclasses.dataclass(frozen=True)
class Piece:
    """Part `part` of `parts` of one file (see the module docstring for how a file is cut)."""

    path: str
    part: int = 0
    parts: int = 1

    def split(self, k: int) -> list[Piece]:
        """This piece cut into k pieces that together hold exactly its records."""
        # Ranges: part i of n over [i/n, (i+1)/n) refines to parts i*k+j of n*k. Strides: records
        # r = i (mod n) refine to r = i + j*n (mod n*k). Both are "part index of n*k".
        if _is_range_format(self.path):
            return [Piece(self.path, self.part * k + j, self.parts * k) for j in range(k)]
        return [Piece(self.path, self.part + j * self.parts, self.parts * k) for j in range(k)]


def _is_range_format(path: str) -> bool:
    return extension(path) in (".jsonl", ".parquet", ".arrayrecord", ".array_record")


def shard_pieces(files: Sequence[str], shard_index: int, shard_count: int) -> list[Piece]:
    """The pieces process `shard_index` of `shard_count` reads (by file, or by part when there
    are fewer files than processes). Shards are disjoint and together hold every record."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(
            f"shard_index: got {shard_index}; expected an index in [0, shard_count={shard_count})"
        )
    if len(files) >= shard_count:
        return [Piece(f) for f in files[shard_index::shard_count]]
    return [Piece(f, shard_index, shard_count) for f in files]


def refine_pieces(pieces: Sequence[Piece], at_least: int) -> list[Piece]:
    """Cuts every piece evenly until there are at least `at_least` pieces (one per grain
    worker); the same records, in the same pieces-then-parts order."""
    if len(pieces) >= at_least or not pieces:
        return list(pieces)
    k = -(-at_least // len(pieces))
    return [sub for piece in pieces for sub in piece.split(k)]


# ---------------------------------------------------------------------------------------- readers
# Each reader yields (key, text or None, resume) for the records of one piece, in file order:
# `key` identifies the record within its file; `resume` passed back as `start` continues after it.
# None texts (blank or null records) still advance the position.


def split_text_documents(text: str) -> list[str]:
    """Splits text into documents at runs of two or more blank lines; drops blank documents."""
    return [doc for doc in _DOCUMENT_SEPARATOR.split(text) if doc.strip()]


def iter_text_documents(f, chunk_chars: int = _TEXT_CHUNK_CHARS) -> Iterator[str]:
    """`split_text_documents(f.read())`, reading `chunk_chars` at a time."""
    buffer = ""
    while chunk := f.read(chunk_chars):
        buffer += chunk
        starts = [m.start() for m in _DOCUMENT_SEPARATOR.finditer(buffer)]
        if not starts:
            continue
        # Separators before the last are final; the last may still grow with the next chunk,
        # so the text from its start is kept and scanned again.
        yield from split_text_documents(buffer[: starts[-1]])
        buffer = buffer[starts[-1] :]
    yield from split_text_documents(buffer)


def _strided(records: Iterator[tuple[int, str | None]], piece: Piece, start: int | None):
    for key, text in records:
        if key % piece.parts != piece.part or (start is not None and key < start):
            continue
        yield key, text, key + 1


def _read_txt(piece: Piece, start: int | None):
    with _open_text(piece.path) as f:
        yield from _strided(enumerate(iter_text_documents(f)), piece, start)


def _jsonl_text(path: str, line: bytes, where: str) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except UnicodeDecodeError as e:
        raise ValueError(_utf8_error_message(path, path.lower().endswith(".gz"))) from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{where}: invalid JSON ({e})") from e
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}:{where}: expected a JSON object with a string field 'text'")
    return record["text"]


def _read_jsonl_gz(piece: Piece, start: int | None):
    def lines():
        with _gzip_errors(piece.path), gzip.GzipFile(fileobj=_open_binary(piece.path)) as f:
            yield from enumerate(f)

    for key, line, resume in _strided(lines(), piece, start):
        yield key, _jsonl_text(piece.path, line, str(key + 1)), resume


def _read_jsonl(piece: Piece, start: int | None):
    size = _file_size(piece.path)
    lo, hi = piece.part * size // piece.parts, (piece.part + 1) * size // piece.parts
    with _open_binary(piece.path) as f:
        if start is not None:
            position = start
            f.seek(position)
        elif lo > 0:
            # The line holding byte lo-1 belongs to the previous part.
            f.seek(lo - 1)
            f.readline()
            position = f.tell()
        else:
            position = 0
        line_number = 1 if position == 0 else None
        while position < hi:
            line = f.readline()
            if not line:
                break
            where = str(line_number) if line_number else f"byte {position}"
            yield position, _jsonl_text(piece.path, line, where), position + len(line)
            position += len(line)
            if line_number:
                line_number += 1


def _read_parquet(piece: Piece, start: int | None):

    with _open_binary(piece.path) as raw, _parquet_file(piece.path, raw) as f:
        if "text" not in f.schema_arrow.names:
            raise ValueError(f"{piece.path}: no column 'text' (columns: {f.schema_arrow.names})")
        text_type = f.schema_arrow.field("text").type
        if str(text_type) not in ("string", "large_string", "string_view"):
            raise ValueError(
                f"{piece.path}: column 'text' holds {text_type}; expected strings (one document "
                "per row)"
            )
        rows = f.metadata.num_rows
        lo = piece.part * rows // piece.parts
        hi = (piece.part + 1) * rows // piece.parts
        if start is not None:
            lo = max(lo, start)
        group_start = 0
        for group in range(f.num_row_groups):
            group_rows = f.metadata.row_group(group).num_rows
            group_end = group_start + group_rows
            if group_end > lo and group_start < hi:
                column = f.read_row_group(group, columns=["text"]).column("text")
                first, last = max(lo, group_start), min(hi, group_end)
                texts = column.slice(first - group_start, last - first).to_pylist()
                for offset, text in enumerate(texts):
                    yield first + offset, text, first + offset + 1
            group_start = group_end
            if group_start >= hi:
                break


def _parquet_file(path: str, raw):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(raw)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from e


def _read_array_record(piece: Piece, start: int | None):
    try:
        source = grain.sources.ArrayRecordDataSource([piece.path])
    except ImportError as e:  # array_record is an optional dependency of grain.
        raise ValueError(
            f"{piece.path}: reading ArrayRecord needs the `array_record` package"
        ) from e
    count = len(source)
    lo, hi = piece.part * count // piece.parts, (piece.part + 1) * count // piece.parts
    for index in range(lo if start is None else max(lo, start), hi):
        yield index, bytes(source[index]).decode("utf-8"), index + 1


_READERS = {
    ".txt": _read_txt,
    ".txt.gz": _read_txt,
    ".jsonl": _read_jsonl,
    ".jsonl.gz": _read_jsonl_gz,
    ".parquet": _read_parquet,
    ".arrayrecord": _read_array_record,
    ".array_record": _read_array_record,
}


def read_piece(piece: Piece, start: int | None = None) -> Iterator[tuple[int, str | None, int]]:
    """Streams (key, text, resume) for the records of `piece`; text is None for blank and null
    records. `start`: a `resume` value from an earlier read of the same piece."""
    return _READERS[extension(piece.path)](piece, start)


def piece_documents(piece: Piece) -> Iterator[str]:
    """The non-blank documents of a piece, in file order."""
    for _, text, _ in read_piece(piece):
        if text is not None and text.strip():
            yield text


# ---------------------------------------------------------------------------------------- split

_SPLITS = ("train", "eval", "all")


def is_eval_document(name: str, key: int, eval_fraction: float) -> bool:
    """Whether record `key` of the file named `name` is held out: a hash of both, so the split
    needs no document count and every process decides it alone."""
    digest = hashlib.blake2b(f"{name}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < eval_fraction * 2.0**64


# ---------------------------------------------------------------------------------------- stream


class DocumentStream(grain.IterDataset):
    """A checkpointable grain source of one process's documents, read lazily from its pieces.

    Each epoch visits the pieces (in a fresh order per epoch when shuffled) and yields the
    non-blank documents of the requested split in file order; shuffle documents further with a
    window (make_dataset does). The iterator state is (epoch, piece, resume point, documents so
    far in the epoch): a restored iterator reopens the piece at that point. Grain workers
    (`mp_prefetch`) each take a slice of the pieces.
    """

    def __init__(
        self,
        pieces: Sequence[Piece],
        *,
        names: dict[str, str],
        split: str,
        eval_fraction: float,
        seed: int,
        shuffle: bool,
        num_epochs: int | None,
        description: str = "",
    ):
        super().__init__()
        if split not in _SPLITS:
            raise ValueError(f"split: got {split!r}; expected one of {_SPLITS}")
        if not pieces:
            raise ValueError(f"{description or 'document stream'}: no file to read")
        self.pieces = tuple(pieces)
        self.names = names
        self.split = split
        self.eval_fraction = eval_fraction
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.description = description

    def refined(self, at_least: int) -> DocumentStream:
        """The same stream cut into at least `at_least` pieces (one or more per grain worker)."""
        return DocumentStream(
            refine_pieces(self.pieces, at_least),
            names=self.names,
            split=self.split,
            eval_fraction=self.eval_fraction,
            seed=self.seed,
            shuffle=self.shuffle,
            num_epochs=self.num_epochs,
            description=self.description,
        )

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Keeps the pieces `pieces[sl]` (grain calls this in each worker process)."""
        del sequential_slice
        self.pieces = self.pieces[sl]
        if not self.pieces:
            raise ValueError(
                f"{self.description}: a grain worker got no piece of the corpus (slice {sl})"
            )

    def wants(self, path: str, key: int) -> bool:
        if self.split == "all":
            return True
        held_out = is_eval_document(self.names[path], key, self.eval_fraction)
        return held_out == (self.split == "eval")

    def __iter__(self) -> _DocumentStreamIterator:
        return _DocumentStreamIterator(self)

    def __str__(self) -> str:
        return f"DocumentStream({len(self.pieces)} pieces, split={self.split})"


class _DocumentStreamIterator(grain.DatasetIterator):
    def __init__(self, stream: DocumentStream):
        super().__init__()
        self._stream = stream
        self._epoch = 0
        self._piece = 0  # position in this epoch's piece order
        self._resume: int | None = None
        self._documents = 0  # documents returned in this epoch
        self._reader: Iterator | None = None
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        count = len(self._stream.pieces)
        if not self._stream.shuffle:
            return np.arange(count)
        return np.random.default_rng([self._stream.seed, self._epoch]).permutation(count)

    def __next__(self) -> str:
        stream = self._stream
        while True:
            if stream.num_epochs is not None and self._epoch >= stream.num_epochs:
                raise StopIteration
            if self._piece >= len(self._order):
                if self._documents == 0:
                    raise ValueError(
                        f"{stream.description}: no non-blank {stream.split} document in "
                        f"{len(stream.pieces)} piece(s) of the corpus "
                        f"(first: {stream.pieces[0].path}); use more data or another "
                        "eval_fraction"
                    )
                self._epoch += 1
                self._piece, self._resume, self._documents = 0, None, 0
                self._order = self._epoch_order()
                continue
            piece = stream.pieces[self._order[self._piece]]
            if self._reader is None:
                self._reader = read_piece(piece, self._resume)
            try:
                key, text, resume = next(self._reader)
            except StopIteration:
                self._reader = None
                self._piece, self._resume = self._piece + 1, None
                continue
            self._resume = resume
            if text is None or not text.strip() or not stream.wants(piece.path, key):
                continue
            self._documents += 1
            return text

    def get_state(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "piece": self._piece,
            "resume": -1 if self._resume is None else self._resume,
            "documents": self._documents,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch = int(state["epoch"])
        self._piece = int(state["piece"])
        self._resume = None if state["resume"] < 0 else int(state["resume"])
        self._documents = int(state["documents"])
        self._order = self._epoch_order()
        self._reader = None


# ---------------------------------------------------------------------------------------- corpus


class Corpus:
    """The files of `data_path`, their fingerprint and the train/eval split of their documents.

    Cheap to build (lists files, reads ~2 MiB for the fingerprint); documents are read only by
    the streams and samples taken from it.
    """

    def __init__(self, data_path: str, eval_fraction: float, eval_path: str = ""):
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction: got {eval_fraction}; expected a value in (0, 1)")
        self.data_path = data_path
        self.eval_fraction = eval_fraction
        self.files = list_files(data_path)
        self.names = dict(zip(self.files, _relative_names(self.files), strict=True))
        self.fingerprint = corpus_fingerprint(self.files)
        # A separate held-out corpus: every document of data_path trains, every one of
        # eval_path evaluates, and eval_fraction is unused.
        self.eval_path = eval_path
        self.eval_files: list[str] = []
        if eval_path:
            self.eval_files = list_files(eval_path, key="eval_data_path")
            self.names.update(zip(self.eval_files, _relative_names(self.eval_files), strict=True))
            eval_fingerprint = corpus_fingerprint(self.eval_files)
            self.fingerprint = hashlib.sha256(
                f"{self.fingerprint}\n{eval_fingerprint}".encode()
            ).hexdigest()

    def stream(
        self,
        split: str,
        *,
        shard_index: int = 0,
        shard_count: int = 1,
        seed: int = 0,
        shuffle: bool = False,
        num_epochs: int | None = None,
    ) -> DocumentStream:
        """Process `shard_index`'s documents of `split` ("train", "eval" or "all")."""
        files, kept, source, key = self.files, split, self.data_path, "data_path"
        if self.eval_path and split != "all":
            # Separate files: each split is all of its own files.
            kept = "all"
            if split == "eval":
                files, source, key = self.eval_files, self.eval_path, "eval_data_path"
        return DocumentStream(
            shard_pieces(files, shard_index, shard_count),
            names=self.names,
            split=kept,
            eval_fraction=self.eval_fraction,
            seed=seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            description=(
                f"{key}={source!r} ({split} split, process {shard_index} of {shard_count})"
            ),
        )

    def documents(self, split: str = "all") -> Iterator[str]:
        """Every document of `split`, in file order (reads the whole corpus: small corpora)."""
        return iter(self.stream(split, num_epochs=1))

    def sample(self, max_bytes: int, split: str = "train") -> Iterator[str]:
        """A bounded sample of `split` for tokenizer training: documents from the start of up to
        64 evenly spaced files, an equal byte budget per file, `max_bytes` in all (0: all)."""
        if max_bytes <= 0 or (self.eval_path and split == "eval"):
            yield from self.documents(split)
            return
        budget = max_bytes // len(_evenly_spaced(len(self.files), 64))
        for index in _evenly_spaced(len(self.files), 64):
            path = self.files[index]
            taken = 0
            for key, text, _ in read_piece(Piece(path)):
                if taken >= budget:
                    break
                if text is None or not text.strip():
                    continue
                if (
                    split != "all"
                    and not self.eval_path
                    and is_eval_document(self.names[path], key, self.eval_fraction)
                    != (split == "eval")
                ):
                    continue
                taken += len(text.encode("utf-8"))
                yield text
