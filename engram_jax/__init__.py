"""engram_jax: language models with Engram conditional memory and manifold-constrained
hyper-connections.

The public names below are imported lazily, so `import engram_jax.hashing` (numpy only, used in
input pipelines) does not pull in jax and flax.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CompressedTokenizer": "engram_jax.hashing",
    "NgramHasher": "engram_jax.hashing",
    "table_primes": "engram_jax.hashing",
    "Engram": "engram_jax.engram",
    "HyperConnection": "engram_jax.mhc",
    "sinkhorn": "engram_jax.mhc",
    "expand_streams": "engram_jax.mhc",
    "merge_streams": "engram_jax.mhc",
    "amax_gain": "engram_jax.mhc",
    "mixing_stats": "engram_jax.mhc",
    "MoE": "engram_jax.moe",
    "MLP": "engram_jax.moe",
    "Attention": "engram_jax.attention",
    "MultiHeadLatentAttention": "engram_jax.attention",
    "RMSNorm": "engram_jax.layers",
    "Transformer": "engram_jax.model",
    "base_config": "engram_jax.config",
    "validate": "engram_jax.config",
    "load_config_file": "engram_jax.config",
    "ConfigError": "engram_jax.config",
    "account": "engram_jax.accounting",
    "train_and_evaluate": "engram_jax.train",
    "TrainingStopped": "engram_jax.preemption",
    "Generator": "engram_jax.generate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engram_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
