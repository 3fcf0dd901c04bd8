"""A config file for `engram_jax.train` that reads a run's full config from JSON.

    python -m engram_jax.train --config=engram_jax/experiments/json_config.py:RUN/config.json \
        --workdir=RUN

The experiments write each run's exact config as `config.json` beside its outputs, so a run is
reproduced (or resumed) by that one command. Keys the schema does not declare are refused.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from engram_jax.config import ConfigError, base_config


def apply_values(
    config: ml_collections.ConfigDict, values: dict[str, Any], where: str = "config"
) -> None:
    """Sets nested `values` onto `config` in place; an undeclared key raises ConfigError."""
    for key, value in values.items():
        if key not in config:
            raise ConfigError(
                f"{where}.{key}: not a config key (declared: {', '.join(sorted(config.keys()))})"
            )
        if isinstance(config[key], ml_collections.ConfigDict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: got {value!r}; expected a mapping")
            apply_values(config[key], value, f"{where}.{key}")
        else:
            config[key] = tuple(value) if isinstance(value, list) else value


def get_config(path: str) -> ml_collections.ConfigDict:
    """`base_config()` with the values of the JSON file at `path`."""
    if not path:
        raise ConfigError("json_config.py needs a path: --config=json_config.py:PATH.json")
    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    config = base_config()
    apply_values(config, values)
    return config
