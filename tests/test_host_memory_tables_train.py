"""The training program with Engram, OverEncoding and per-layer-embedding tables in host RAM
(`table_placement="host"`): the losses and evaluations equal the device placement's, a restart
from a host checkpoint continues exactly, and a checkpoint moves between the placements."""

from __future__ import annotations

import os
import shutil

import chex
import numpy as np
import pytest

from engram_jax import config as config_lib
from engram_jax import generate as generate_lib
from engram_jax import train as train_lib
from engram_jax.configs import config_path

# `_write_corpus` fills conftest's module-scoped `corpus` fixture.
from tests.test_train import (  # noqa: F401
    _eval_rows,
    _final_params,
    _full_forward_greedy,
    _losses,
    _small_config,
    _write_corpus,
)

NUM_STEPS = 4
RESTART_STEP = 2
RTOL = 1e-5  # host and device sum a row's gradients in different orders


def _config(corpus: str, placement: str):
    """test_train's small Engram model with the shipped OverEncoding and PLE sections added."""
    c = _small_config(corpus)
    c.update(num_train_steps=NUM_STEPS, checkpoint_every=RESTART_STEP, eval_every=RESTART_STEP)
    c.table_placement = placement
    for name, section in (("tiny_overencoding", "overencoding"), ("tiny_ple", "ple")):
        shipped = config_lib.load_config_file(config_path(name)).model[section]
        config_lib.apply_values(c.model[section], config_lib.to_dict(shipped))
    c.model.overencoding.base_rows = 1000  # the shipped default rule on a small table
    config_lib.validate(c)
    return c


def _restart(source: str, target: str, corpus: str, placement: str) -> str:
    """Copies a finished run without its last checkpoint and trains it on from RESTART_STEP."""

    def newer_checkpoints(directory, names):
        if os.path.basename(directory) != "checkpoints":
            return []
        return [n for n in names if n.isdigit() and int(n) > RESTART_STEP]

    shutil.copytree(source, target, ignore=newer_checkpoints, dirs_exist_ok=True)
    train_lib.train_and_evaluate(_config(corpus, placement), target)
    return target


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Full runs on each placement, and restarts from their step-2 checkpoints."""
    out = {}
    for placement in ("device", "host"):
        out[placement] = str(tmp_path_factory.mktemp(placement))
        train_lib.train_and_evaluate(_config(corpus, placement), out[placement])
    for source, placement in (("host", "host"), ("host", "device"), ("device", "host")):
        target = str(tmp_path_factory.mktemp(f"{source}_to_{placement}"))
        out[f"{source}_to_{placement}"] = _restart(out[source], target, corpus, placement)
    return out


def _assert_close_runs(run: str, reference: str) -> None:
    losses, expected = _losses(run), _losses(reference)
    assert sorted(losses) == sorted(expected) == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose(
        [losses[s] for s in sorted(losses)], [expected[s] for s in sorted(expected)], rtol=RTOL
    )
    params, tables = _final_params(run)
    expected_params, expected_tables = _final_params(reference)
    chex.assert_trees_all_close(params, expected_params, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(tables, expected_tables, rtol=1e-4, atol=1e-4)


def test_host_tables_train_and_evaluate_as_device_tables(runs):
    _assert_close_runs(runs["host"], runs["device"])
    host_evals, device_evals = _eval_rows(runs["host"]), _eval_rows(runs["device"])
    assert sorted(host_evals) == sorted(device_evals) == [RESTART_STEP, NUM_STEPS]
    for step, row in device_evals.items():
        for key in ("eval_loss", "hc_composite_forward_gain"):
            np.testing.assert_allclose(host_evals[step][key], row[key], rtol=RTOL, err_msg=key)
    _, tables = _final_params(runs["host"])
    assert {"overencoding", "ple", "layer_1"} <= set(tables)


def test_host_restart_continues_exactly(runs):
    assert _losses(runs["host_to_host"]) == _losses(runs["host"])
    chex.assert_trees_all_equal(_final_params(runs["host_to_host"]), _final_params(runs["host"]))


def test_checkpoints_move_between_placements(runs):
    # Steps 3-4 of a host checkpoint on the device, and of a device checkpoint on the host.
    _assert_close_runs(runs["host_to_device"], runs["device"])
    _assert_close_runs(runs["device_to_host"], runs["host"])


def test_generates_from_a_host_trained_checkpoint(runs):
    """Greedy decoding equals the full forward's argmax, and reads the same tokens with the
    Engram tables in host RAM (the OverEncoding and PLE tables are parameters either way)."""
    sampling = generate_lib.SamplingConfig(max_tokens=3, temperature=0.0)
    tokens = {}
    for placement in ("device", "host"):
        generator = generate_lib.Generator(runs["host"], table_placement=placement)
        prompt = np.asarray(generator.tokenizer.encode("the memory table").ids, np.int32)
        tokens[placement] = generator.generate_ids(prompt, sampling)
        generator.close()
        if placement == "device":  # the reference reads the tables among the parameters
            steps = len(tokens["device"])
            assert steps > 0
            assert tokens["device"] == _full_forward_greedy(generator, prompt, steps, True)
    assert tokens["host"] == tokens["device"]
