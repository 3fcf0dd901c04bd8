"""The training program with OverEncoding, per-layer embeddings and UltraMem in place of Engram:
each trains, checkpoints its tables in the `memory` item, resumes exactly after an interruption,
and generates with its decode cache what a full forward pass predicts."""

from __future__ import annotations

import os
import time

import chex
import numpy as np
import pytest

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import config as config_lib
from engram_jax import generate as generate_lib
from engram_jax import storage
from engram_jax import train as train_lib
from engram_jax.configs import config_path

# `_write_corpus` fills conftest's module-scoped `corpus` fixture.
from tests.test_train import (  # noqa: F401
    _full_forward_greedy,
    _losses,
    _small_config,
    _write_corpus,
)

NUM_STEPS = 4
VARIANTS = ("tiny_overencoding", "tiny_ple", "tiny_ultramem")


class _Interrupted(Exception):
    pass


def _final_state(workdir: str):
    """Dense parameters and memory tables ({} without tables) of the newest checkpoint."""
    store = checkpoint_lib.CheckpointStore(storage.join(workdir, "checkpoints"), create=False)
    restored = store.restore(items=("state", "memory"))
    store.close()
    memory = restored.get("memory") or {}
    return restored["state"]["params"], memory.get("tables", {})


def _variant_config(corpus: str, name: str):
    """test_train's small model with the shipped config's memory section in place of Engram."""
    c = _small_config(corpus)
    c.num_train_steps = NUM_STEPS
    c.checkpoint_every = 2
    c.eval_every = 2
    shipped = config_lib.load_config_file(config_path(name)).model
    m = c.model
    m.engram.layer_ids = ()
    for section in ("overencoding", "ple", "ultramem"):
        config_lib.apply_values(m[section], config_lib.to_dict(shipped[section]))
    if name == "tiny_overencoding":
        m.overencoding.base_rows = 1000  # the shipped default rule on a small table
    if name == "tiny_ultramem":
        m.ultramem.layer_ids = (1,)  # the small model has two layers
    config_lib.validate(c)
    return c


@pytest.fixture(scope="module", params=VARIANTS)
def trained(request, corpus, tmp_path_factory):
    """An uninterrupted run and a run interrupted after its step-2 checkpoint, then resumed."""
    name = request.param
    reference = str(tmp_path_factory.mktemp(f"{name}_reference"))
    train_lib.train_and_evaluate(_variant_config(corpus, name), reference)
    resumed = str(tmp_path_factory.mktemp(f"{name}_resumed"))
    committed = os.path.join(resumed, "checkpoints", "2")

    def interrupt(step, state):
        if step == 2:
            while not os.path.isdir(committed):
                time.sleep(0.01)
            raise _Interrupted

    with pytest.raises(_Interrupted):
        train_lib.train_and_evaluate(_variant_config(corpus, name), resumed, step_hook=interrupt)
    train_lib.train_and_evaluate(_variant_config(corpus, name), resumed)
    return name, reference, resumed


def test_trains_and_resumes_exactly(trained):
    name, reference, resumed = trained
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    assert all(np.isfinite(v) for v in losses.values())
    assert _losses(resumed) == losses
    params, memory = _final_state(reference)
    chex.assert_trees_all_equal(_final_state(resumed), (params, memory))
    expected = {
        "tiny_overencoding": {"overencoding"},
        "tiny_ple": {"ple"},
        "tiny_ultramem": {"layer_1"},  # layer_1/ultramem/values
    }[name]
    assert set(memory) == expected


def test_greedy_generation_equals_full_forward_argmax(trained):
    _, reference, _ = trained
    generator = generate_lib.Generator(reference)
    sampling = generate_lib.SamplingConfig(max_tokens=3, temperature=0.0)
    prompt = np.asarray(generator.tokenizer.encode("the memory table").ids, np.int32)
    tokens = generator.generate_ids(prompt, sampling)
    generator.close()
    assert len(tokens) > 0
    assert tokens == _full_forward_greedy(generator, prompt, len(tokens), with_hash_ids=False)
