"""RMSNorm and the per-token projection against direct numpy transcriptions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.layers import RMSNorm, rms_norm, token_einsum


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


@pytest.mark.parametrize(
    "spec, x_shape, kernel_shape",
    [
        ("btd,dnh->btnh", (2, 3, 8), (8, 4, 5)),  # attention q/k/v (uses the letter n itself)
        ("btnh,nhd->btd", (2, 3, 4, 5), (4, 5, 8)),  # attention output
        ("btgd,gdk->btk", (2, 3, 4, 8), (4, 8, 6)),  # mHC coefficient projection
        ("btmw,mwgd->btgd", (1, 5, 3, 2), (3, 2, 4, 8)),  # Engram keys
    ],
)
def test_token_einsum_equals_the_einsum_and_its_gradients(spec, x_shape, kernel_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)
    expected = np.einsum(spec, np.float64(x), np.float64(kernel))
    np.testing.assert_allclose(token_einsum(spec, x, kernel), expected, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda a, b: jnp.sum(jnp.sin(token_einsum(spec, a, b))), (0, 1))(x, kernel)
    ref = jax.grad(lambda a, b: jnp.sum(jnp.sin(jnp.einsum(spec, a, b))), (0, 1))(x, kernel)
    for got, want in zip(grads, ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_einsum_refuses_a_spec_without_token_axes():
    with pytest.raises(ValueError, match="bt"):
        token_einsum("dk,btd->btk", jnp.ones((2, 3)), jnp.ones((1, 2, 2)))
