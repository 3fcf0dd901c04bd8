"""Sampling filters: greedy, top-k and top-p keep exactly the tokens they should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.generate import sample_logits

LOGITS = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.15]]))  # probabilities of tokens 0..3


def _draws(temperature, top_k, top_p, n=400):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    sample = jax.jit(jax.vmap(lambda k: sample_logits(LOGITS, k, temperature, top_k, top_p)[0]))
    return np.asarray(sample(keys))


def test_greedy_and_single_token_filters_pick_the_argmax():
    assert int(sample_logits(LOGITS, jax.random.PRNGKey(1), 0.0, 0, 1.0)[0]) == 1
    assert set(_draws(1.0, 1, 1.0)) == {1}
    assert set(_draws(1.0, 0, 0.4)) == {1}  # 0.5 alone already reaches 0.4


def test_top_k_and_top_p_keep_the_expected_sets():
    assert set(_draws(1.0, 2, 1.0)) == {1, 2}
    # Nucleus 0.9: 0.5 + 0.3 = 0.8 < 0.9, so 0.15 joins; 0.05 stays out.
    assert set(_draws(1.0, 0, 0.9)) == {1, 2, 3}
    draws = _draws(1.0, 0, 1.0, n=2000)
    frequencies = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(frequencies, [0.05, 0.5, 0.3, 0.15], atol=0.04)


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="top_p"):
        sample_logits(LOGITS, jax.random.PRNGKey(0), 1.0, 0, 0.0)
