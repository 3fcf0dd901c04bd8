"""A config file for `engram_jax.train` that reads a run's full config from JSON.

    python -m engram_jax.train --config=engram_jax/experiments/json_config.py:RUN/config.json \
        --workdir=RUN

The experiments write each run's exact config as `config.json` beside its outputs, so a run is
reproduced (or resumed) by that one command. Keys the schema does not declare are refused.
"""

from __future__ import annotations

import json

import ml_collections

from engram_jax.config import ConfigError, apply_values, base_config


def get_config(path: str) -> ml_collections.ConfigDict:
    """`base_config()` with the values of the JSON file at `path`."""
    if not path:
        raise ConfigError("json_config.py needs a path: --config=json_config.py:PATH.json")
    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    config = base_config()
    apply_values(config, values)
    return config
