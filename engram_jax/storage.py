"""Path helpers for local directories and object-store URLs (`gs://`, `s3://`, ...) via epath.

Every workdir, data and tokenizer path of the trainer goes through these, so a bucket works wherever
a directory does. `gs://` needs `gcsfs` (a dependency of this package); epath picks it by the URL's
scheme. Object stores have no rename and no append: `write_*` replace a whole object in one upload
(readers see the old or the new object, never a part), and local writes go through a temporary file
and an atomic rename for the same guarantee.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object-store URL (`gs://b/x`) rather than a local path."""
    return bool(_URL.match(os.fspath(path)))


def path(p: str | os.PathLike) -> epath.Path:
    """An `epath.Path` for a local path or a URL."""
    return epath.Path(p)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` as a string (URL-safe: never `os.path.join`'s backslashes)."""
    return os.fspath(epath.Path(base).joinpath(*parts))


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def isdir(p: str | os.PathLike) -> bool:
    return path(p).is_dir()


def isfile(p: str | os.PathLike) -> bool:
    return path(p).is_file()


def makedirs(p: str | os.PathLike) -> None:
    """Creates a directory and its parents (a no-op on object stores without directories)."""
    path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: str | os.PathLike) -> list[str]:
    """Names (not paths) of the entries of a directory, sorted."""
    return sorted(child.name for child in path(p).iterdir())


def glob(pattern: str) -> list[str]:
    """Files matching a glob (`**` recurses), sorted; works for URLs (`gs://b/data/*.txt`)."""
    if not is_url(pattern):
        import glob as glob_lib

        return sorted(glob_lib.glob(pattern, recursive=True))
    # Split at the first path segment holding a glob character; epath globs relative to a root.
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if _GLOB_CHARS.search(part):
            root, rest = "/".join(parts[:i]), "/".join(parts[i:])
            return sorted(os.fspath(p) for p in path(root).glob(rest))
    return [pattern] if exists(pattern) else []


def walk_files(p: str | os.PathLike) -> list[str]:
    """Every file below a directory, recursively, sorted (epath refuses `**` globs on GCS)."""
    files, pending = [], [path(p)]
    while pending:
        for child in pending.pop().iterdir():
            if child.is_dir():
                pending.append(child)
            else:
                files.append(os.fspath(child))
    return sorted(files)


def open_file(p: str | os.PathLike, mode: str = "r", **kwargs: Any) -> IO:
    """Opens a file for reading (`r`, `rb`) or for writing a whole new object (`w`, `wb`)."""
    return path(p).open(mode, **kwargs)


def read_text(p: str | os.PathLike) -> str:
    return path(p).read_text(encoding="utf-8")


def read_bytes(p: str | os.PathLike) -> bytes:
    return path(p).read_bytes()


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """Replaces the file atomically: a reader sees the old content or the new, never a part."""
    target = path(p)
    if is_url(p):
        target.write_bytes(data)  # one upload: object stores publish an object whole
        return
    directory = os.path.dirname(os.path.abspath(os.fspath(p)))
    os.makedirs(directory, exist_ok=True)
    # A unique temporary name: processes on several hosts can share a PID and a directory.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.fspath(p))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(p: str | os.PathLike, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(p, text.encode("utf-8"))


def remove(p: str | os.PathLike) -> None:
    """Deletes a file; a missing file is not an error."""
    with contextlib.suppress(FileNotFoundError):
        path(p).unlink()


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies one file's bytes (between local paths and URLs, either way)."""
    write_bytes(dst, read_bytes(src))


@contextlib.contextmanager
def local_copy(p: str | os.PathLike) -> Iterator[str]:
    """A local filename holding `p`'s bytes, for libraries that only open local files."""
    if not is_url(p):
        yield os.fspath(p)
        return
    name = path(p).name
    with tempfile.TemporaryDirectory(prefix="engram_jax_") as tmp:
        local = os.path.join(tmp, name)
        with open(local, "wb") as f:
            f.write(read_bytes(p))
        yield local
