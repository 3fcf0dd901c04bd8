"""RMSNorm against a direct numpy transcription."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.layers import RMSNorm, rms_norm


def test_rms_norm_matches_numpy_and_keeps_dtype():
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    scale = np.linspace(0.5, 1.5, 8).astype(np.float32)
    expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(rms_norm(jnp.asarray(x), jnp.asarray(scale), 1e-6), expected, 1e-6)
    y = rms_norm(jnp.asarray(x, jnp.bfloat16), None, 1e-6)
    assert y.dtype == jnp.bfloat16


def test_rms_norm_module_gain_starts_at_one():
    x = jnp.ones((2, 4, 8)) * 3.0
    module = RMSNorm(eps=1e-6)
    variables = nn.meta.unbox(module.init(jax.random.PRNGKey(0), x))
    np.testing.assert_array_equal(variables["params"]["scale"], np.ones(8, np.float32))
    np.testing.assert_allclose(module.apply(variables, x), np.ones((2, 4, 8)), rtol=1e-5)
