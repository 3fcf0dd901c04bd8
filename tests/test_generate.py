"""Sampling filters: greedy, top-k and top-p keep exactly the tokens they should."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.generate import mask_beyond_vocab, sample_logits

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


def test_command_line_refuses_negative_max_tokens(tmp_path):
    """Checked before any checkpoint is read (the workdir here does not even exist)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engram_jax.generate",
            f"--workdir={tmp_path / 'none'}",
            "--prompt=hello",
            "--max_tokens=-3",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "--max_tokens: got -3; expected a positive number of tokens" in result.stderr


def test_ids_past_the_tokenizer_are_never_drawn():
    """The model's vocabulary (6) is larger than the tokenizer's (4); ids 4 and 5 score highest."""
    logits = jnp.log(jnp.asarray([[0.05, 0.1, 0.1, 0.05, 0.4, 0.3]]))
    masked = mask_beyond_vocab(logits, 4)
    assert int(sample_logits(masked, jax.random.PRNGKey(0), 0.0, 0, 1.0)[0]) in (1, 2)
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draws = jax.vmap(lambda k: sample_logits(masked, k, 1.0, 0, 1.0)[0])(keys)
    assert set(np.asarray(draws)) == {0, 1, 2, 3}
