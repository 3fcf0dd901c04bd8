"""engram_jax: language models with Engram conditional memory and manifold-constrained
hyper-connections."""

__version__ = "0.1.0"
