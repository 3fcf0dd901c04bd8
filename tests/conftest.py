"""Suite-wide settings: strict rank promotion, and helpers for multi-device subprocess tests."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
