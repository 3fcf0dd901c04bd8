"""The shipped AltUp and MatFormer configs through the trainer: a few steps, an exact resume after
an interruption, and cached greedy decoding equal to the full forward pass (for MatFormer also at
a sliced granularity, without retraining)."""

from __future__ import annotations

import dataclasses

import chex
import jax
import numpy as np
import pytest

from engram_jax import data as data_lib
from engram_jax import generate as generate_lib
from engram_jax import train as train_lib
from engram_jax.config import load_config_file
from engram_jax.configs import config_path

# `_write_corpus` fills conftest's module-scoped `corpus` fixture.
from tests.test_train import (  # noqa: F401
    _final_params,
    _losses,
    _short_program,
    _write_corpus,
)

NUM_STEPS = 4


class _Interrupt(Exception):
    pass


def _config(name: str, corpus: str):
    """The shipped config with a short training program; the model keys stay as shipped (only
    the vocabulary shrinks to what the small corpus' tokenizer has)."""
    c = load_config_file(config_path(name))
    _short_program(c, corpus, NUM_STEPS, every=2, warmup=1)
    return c


@pytest.fixture(scope="module", params=["tiny_altup", "tiny_matformer"])
def trained(request, corpus, tmp_path_factory):
    name = request.param
    workdir = str(tmp_path_factory.mktemp(name))
    final = train_lib.train_and_evaluate(_config(name, corpus), workdir)
    return name, workdir, final


def test_trains_and_resumes_exactly(trained, corpus, tmp_path):
    name, reference_dir, final = trained
    assert np.isfinite(final["eval_loss"])
    if name == "tiny_altup":  # AltUp's prediction operators feed the Amax diagnostics
        assert np.isfinite(final["hc_max_composite_forward_gain"])
    workdir = str(tmp_path / "interrupted")
    half = NUM_STEPS // 2

    def interrupt(step, state):
        if step == half:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_lib.train_and_evaluate(_config(name, corpus), workdir, step_hook=interrupt)
    train_lib.train_and_evaluate(_config(name, corpus), workdir)
    assert sorted(_losses(workdir)) == list(range(1, NUM_STEPS + 1))
    assert _losses(workdir) == _losses(reference_dir)
    chex.assert_trees_all_equal(_final_params(workdir), _final_params(reference_dir))


def _greedy_equals_full_forward(generator: generate_lib.Generator) -> None:
    sampling = generate_lib.SamplingConfig(max_tokens=4, temperature=0.0)
    prompt = np.asarray(generator.tokenizer.encode("the memory table").ids, np.int32)
    tokens = generator.generate_ids(prompt, sampling)
    assert len(tokens) > 0
    cfg = generator.model_config
    # Capacity E/K, as decoding uses: the reference must not drop a token either.
    moe = dataclasses.replace(cfg.moe, capacity_factor=cfg.moe.num_experts / cfg.moe.top_k)
    forward = jax.jit(train_lib.Transformer(dataclasses.replace(cfg, moe=moe)).apply)
    # One fixed length (one compile): the model and its hashing are causal, so the padding after
    # the history changes no logit before it.
    length = len(prompt) + len(tokens)
    history = list(prompt)
    expected = []
    for _ in tokens:
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(history)] = history
        segments = np.ones_like(padded)
        hash_ids = data_lib.compute_hash_ids(padded, segments, generator.engram)
        logits, _ = forward(generator.variables, padded, None, segments, hash_ids)
        token = int(np.argmax(np.asarray(logits)[0, len(history) - 1]))
        if token == generator.spec.eos_id:
            break
        expected.append(token)
        history.append(token)
    assert tokens == expected


def test_cached_decoding_equals_the_full_forward(trained):
    name, workdir, _ = trained
    with generate_lib.Generator(workdir) as generator:
        _greedy_equals_full_forward(generator)
    if name == "tiny_matformer":
        # Every granularity and a per-layer mix, sliced from the trained weights: no retraining.
        for granularity in ((0,), (1,), (2,), (0, 3, 1, 2)):
            with generate_lib.Generator(workdir, ffn_granularity=granularity) as generator:
                assert generator.model_config.matformer.inference_granularity == granularity
                _greedy_equals_full_forward(generator)
