"""The shipped configs: `configs/<name>.py` files installed with the package.

The repository's top-level `configs/` is a symbolic link to this directory, so
`--config=configs/tiny.py` (from the repository root) and `--config=tiny` (from anywhere, also
after a non-editable install) name the same file. Each file defines `get_config()`; it is loaded
by path (`engram_jax.config.load_config_file`), never imported as a module.

`python -m engram_jax.configs` lists them with their parameter counts.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def config_names() -> list[str]:
    """Names of the shipped configs (file stems), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def config_path(name: str) -> Path:
    """Path of the shipped config `name` (e.g. "tiny").

    Raises:
      FileNotFoundError: no shipped config has that name (the message lists them).
    """
    path = CONFIG_DIR / f"{name}.py"
    if not _NAME.match(name) or not path.is_file():
        raise FileNotFoundError(
            f"config {name!r}: no such file and no shipped config of that name; expected a path "
            f"to a config file or one of {', '.join(config_names())}"
        )
    return path


def resolve(value: str) -> str:
    """A `--config` value as a file path: an existing file (or `path:arguments`) is kept, a bare
    name (`tiny`) becomes the shipped config's path."""
    if os.path.exists(value) or ":" in value or not _NAME.match(value):
        return value
    return str(config_path(value))


def resolve_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
    """argv with the value of `--config=NAME` / `--config NAME` resolved by `resolve`.

    A program calls this on `sys.argv` before absl parses it, so ml_collections' config-file flag
    receives a path. An unknown name exits with status 2 and the list of shipped configs.
    """
    out = list(argv)
    try:
        for i, arg in enumerate(out):
            for prefix in (f"--{flag}=", f"-{flag}="):
                if arg.startswith(prefix):
                    out[i] = prefix + resolve(arg[len(prefix) :])
            if arg in (f"--{flag}", f"-{flag}") and i + 1 < len(out):
                out[i + 1] = resolve(out[i + 1])
    except FileNotFoundError as e:
        print(f"--{flag}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return out
