"""Operations on ConfigDicts that need no knowledge of the schema: load a config file by path,
set nested JSON-like values, and the JSON form saved with checkpoints. `engram_jax.config`
re-exports all of them beside the schema."""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
    """A config value is missing, out of range or inconsistent; the message lists every problem."""


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (`configs/<name>.py`) loaded by path.

    Config files that extend another one (engram_27b extends moe_27b) use it with a path beside
    themselves, so `configs/` needs no package `__init__`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"engram_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} defines no get_config()")
    try:
        return module.get_config()
    except AttributeError as e:
        unknown = _UNKNOWN_KEY.search(str(e))
        if unknown is None:
            raise
        hint = _KEY_HINT.search(str(e))
        raise ConfigError(
            f"config file {str(path)!r}: sets key {unknown.group(1)!r}, which base_config() does "
            "not declare" + (f"; did you mean {hint.group(1)!r}?" if hint else "")
        ) from e


def apply_values(
    config: ml_collections.ConfigDict, values: Mapping[str, Any], where: str = "config"
) -> None:
    """Sets nested `values` (JSON-like: lists for tuples, "inf" for infinite floats) onto `config`
    in place; a key `config` does not declare raises ConfigError naming it."""
    for key, value in values.items():
        if key not in config:
            raise ConfigError(
                f"{where}.{key}: not a config key (declared: {', '.join(sorted(config.keys()))})"
            )
        if isinstance(config[key], ml_collections.ConfigDict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.{key}: got {value!r}; expected a mapping")
            apply_values(config[key], value, f"{where}.{key}")
        elif isinstance(value, list):
            config[key] = tuple(value)
        elif isinstance(config[key], float) and isinstance(value, str):
            config[key] = float(value)  # to_dict writes infinities as "inf"
        else:
            config[key] = value


# ml_collections' message for a key added to a locked ConfigDict (it also lists every field).
_UNKNOWN_KEY = re.compile(r'Key "([^"]+)" does not exist and cannot be added')
_KEY_HINT = re.compile(r'Did you mean "([^"]+)"')


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-friendly nested dict of the config, for checkpoint metadata."""

    def convert(value: Any) -> Any:
        if isinstance(value, config_dict.ConfigDict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, float) and math.isinf(value):
            return str(value)
        return value

    return convert(config)
