"""Bad inputs at the edges: config values that cannot run, paths that are not regular files, and
library calls with ids, labels, temperatures or rates outside their range.

Each case gets a clear error naming the input, or a documented behaviour checked here (the
library's values under `jit`, where nothing can raise; see `engram_jax.input_checks`)."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jax.experimental import checkify

from engram_jax import config as config_lib
from engram_jax import corpus, data, input_checks, memory_estimate
from engram_jax.accounting import account
from engram_jax.generate import DecodeStep, SamplingConfig, sample_logits
from engram_jax.model import Transformer, cross_entropy_loss
from engram_jax.moe import update_router_bias

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.py"
T = 8


def _tiny() -> ml_collections.ConfigDict:
    return config_lib.load_config_file(TINY)


def _float_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys += _float_keys(value, f"{prefix}{key}.")
        elif isinstance(value, float):
            keys.append(f"{prefix}{key}")
    return keys


def _set(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        config = config[part]
    config[last] = value


# ---------------------------------------------------------------------------- config values


@pytest.mark.parametrize("key", _float_keys(config_lib.base_config()))
def test_every_float_key_refuses_nan_and_inf(key):
    for value in (math.nan, math.inf, -math.inf):
        config = _tiny()
        _set(config, key, value)
        if key == "clip_norm" and value == math.inf:  # documented: never clips
            config_lib.validate(config)
            continue
        with pytest.raises(config_lib.ConfigError, match=rf"config\.{key}: got -?(nan|inf)"):
            config_lib.validate(config)


@pytest.mark.parametrize(
    "key, value",
    [
        ("seq_len", 10**9),
        ("model.hc.n_streams", 1000),
        ("model.hc.sinkhorn_iters", 10**6),
        ("model.vocab_size", 10**10),
    ],
)
def test_sizes_no_device_holds_are_refused_by_validate(key, value):
    config = _tiny()
    _set(config, key, value)
    with pytest.raises(config_lib.ConfigError, match=rf"config\.{key}: got {value}; expected <="):
        config_lib.validate(config)


def test_memory_estimate_terms_match_their_formulas():
    """Independent arithmetic for the tiny config on one device (float32, Adam tables)."""
    cfg = config_lib.validate(_tiny())
    t, m = cfg.train, cfg.model
    estimate = memory_estimate.estimate_train_step(cfg, device_count=1)
    terms = {term.what: term.bytes for term in estimate.terms}
    acc = account(m, t.seq_len)
    tokens = t.batch_size * t.seq_len
    dense = acc.total_params - acc.engram_table_params
    # Parameters, gradients and two Adam moments, all float32.
    assert sum(v for k, v in terms.items() if "parameters" in k or "LM head" in k) == 16 * dense
    # Tables: values + Adam's two float32 moments (sparse updates keep no table-sized grads).
    assert terms["Engram tables and their optimizer state"] == 12 * acc.engram_table_params
    assert terms["float32 logits, log-probabilities and their gradient"] == 12 * tokens * 4096
    g, iters = m.hc.n_streams, m.hc.sinkhorn_iters
    sinkhorn = terms["mHC mixing matrices over the Sinkhorn iterations"]
    assert sinkhorn == 2 * m.num_layers * tokens * iters * g * g * 4
    assert estimate.device_bytes == sum(terms.values())


def test_memory_check_refuses_names_keys_and_can_be_disabled():
    config = _tiny()
    config_lib.validate(config)
    memory_estimate.check_train_step(config_lib.validate(config))  # the shipped config fits
    config.seq_len = 65536  # attention probabilities: B * heads * T^2 * 4 bytes per layer
    with pytest.raises(config_lib.ConfigError, match=r"attention probabilities .*\(seq_len") as e:
        memory_estimate.check_train_step(config_lib.validate(config))
    assert "memory_limit_gib" in str(e.value)
    config.seq_len = 128
    config.memory_limit_gib = 1e-3  # 1 MiB: smaller than the tiny model's parameters
    with pytest.raises(config_lib.ConfigError, match=r"memory_limit_gib=0\.001"):
        memory_estimate.check_train_step(config_lib.validate(config))
    config.memory_limit_gib = -1.0
    config.seq_len = 65536
    memory_estimate.check_train_step(config_lib.validate(config))  # disabled


# ---------------------------------------------------------------------------- paths


@pytest.fixture()
def odd_paths(tmp_path) -> dict[str, str]:
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jsonl"
    os.symlink(loop, loop)
    folder = tmp_path / "folder.json"
    folder.mkdir()
    sock = tmp_path / "s.txt"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    yield {
        "a FIFO": str(fifo),
        "a symbolic link loop": str(loop),
        "a character device": "/dev/null",
        "a directory": str(folder),
        "a socket": str(sock),
    }
    server.close()


def test_data_paths_say_what_they_are(odd_paths):
    for what, path in odd_paths.items():
        if what == "a directory":
            continue  # a directory of corpus files is a valid data_path
        with pytest.raises(ValueError, match=rf"data_path='{path}': {what}"):
            corpus.list_files(path)
        with pytest.raises(ValueError, match=rf"eval_data_path='{path}': {what}"):
            corpus.list_files(path, key="eval_data_path")


def test_a_fifo_inside_a_data_directory_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    os.mkfifo(tmp_path / "b.txt")
    with pytest.raises(ValueError, match=r"b\.txt' is a FIFO"):
        corpus.list_files(str(tmp_path))


def test_tokenizer_paths_say_what_they_are(odd_paths):
    for what, path in odd_paths.items():
        with pytest.raises(FileNotFoundError, match=rf"tokenizer_path='{path}': {what}"):
            data.load_tokenizer(path)


def test_missing_eval_data_path_is_named_as_such(tmp_path):
    (tmp_path / "train.txt").write_text("hello\n")
    missing = str(tmp_path / "held_out.jsonl")
    with pytest.raises(FileNotFoundError, match=rf"^eval_data_path='{missing}': no such"):
        corpus.Corpus(str(tmp_path / "train.txt"), 0.1, eval_path=missing)


def test_parquet_with_numbers_and_a_fake_parquet_name_the_file(tmp_path):
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), numbers)
    with pytest.raises(ValueError, match=rf"{numbers}: column 'text' holds int64"):
        list(corpus.Corpus(str(numbers), 0.5).documents())
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet at all\n" * 10)
    with pytest.raises(ValueError, match=rf"{fake}: not a readable Parquet file"):
        list(corpus.Corpus(str(fake), 0.5).documents())


# ---------------------------------------------------------------------------- library calls


@pytest.fixture(scope="module")
def tiny_model():
    cfg = config_lib.validate(_tiny()).model
    model = Transformer(cfg)
    e = cfg.engram
    hash_ids = jnp.zeros((2, len(e.layer_ids), T, e.num_heads), jnp.int32)  # [B, L_e, T, M]
    tokens = jnp.arange(1, 2 * T + 1, dtype=jnp.int32).reshape(2, T)  # [B, T]
    variables = model.init(jax.random.PRNGKey(0), tokens, None, None, hash_ids)
    apply = jax.jit(lambda tokens: model.apply(variables, tokens, None, None, hash_ids)[0])
    return cfg, model, variables, hash_ids, tokens, apply


@pytest.mark.slow
def test_token_ids_outside_the_vocabulary(tiny_model):
    """Eager: ValueError naming the value. Under jit: NaN logits in the whole sequence that holds
    the bad id (attention multiplies its NaN value by the zero weights of earlier queries), for
    negative ids too (which `take` would otherwise wrap to the last rows); the other sequences
    of the batch keep their logits. With debug checks, checkify reports it."""
    cfg, model, variables, hash_ids, tokens, apply = tiny_model
    for bad in (cfg.vocab_size, -1):
        tokens_bad = tokens.at[0, 5].set(bad)
        with pytest.raises(ValueError, match=rf"Transformer: tokens: got {bad} at index \(0, 5\)"):
            model.apply(variables, tokens_bad, None, None, hash_ids)
        logits = np.asarray(apply(tokens_bad))
        assert np.isnan(logits[0]).all()
        np.testing.assert_allclose(logits[1], np.asarray(apply(tokens))[1], rtol=1e-5, atol=1e-6)
    with input_checks.debug_checks():
        checked = checkify.checkify(
            jax.jit(lambda t: model.apply(variables, t, None, None, hash_ids)[0]),
            errors=checkify.user_checks,
        )
        error, _ = checked(tokens.at[0, 2].set(-7))
    with pytest.raises(Exception, match=r"Transformer: tokens: a value outside \[0, 4096\)"):
        error.throw()


def test_labels_outside_the_vocabulary():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)  # [B, T, V]
    targets = np.array([[0, 4, 2], [1, 1, 3]])
    mask = np.ones((2, 3), np.float32)
    log_probs = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    reference = -np.mean(np.take_along_axis(np.asarray(log_probs), targets[..., None], -1))
    np.testing.assert_allclose(cross_entropy_loss(logits, targets, mask)[0], reference, rtol=1e-6)
    for bad in (5, -1):
        with pytest.raises(ValueError, match=rf"cross_entropy_loss: targets: got {bad}"):
            cross_entropy_loss(logits, targets.copy().clip(max=4) * 0 + bad, mask)
    # A masked position may hold anything (padding); under jit an unmasked bad label is NaN.
    masked = mask.copy()
    masked[0, 1] = 0
    padded = targets.copy()
    padded[0, 1] = -1
    loss, count = cross_entropy_loss(logits, padded, masked)
    assert np.isfinite(loss) and count == 5
    jitted = jax.jit(cross_entropy_loss)
    assert np.isnan(jitted(logits, padded, mask)[0])
    assert np.isfinite(jitted(logits, padded, masked)[0])


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0])
def test_non_finite_temperatures_are_refused_like_sampling_config(temperature):
    logits = jnp.zeros((1, 4))
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(logits, jax.random.PRNGKey(0), temperature, 0, 1.0)
    with pytest.raises(ValueError, match="temperature: got"):
        SamplingConfig(temperature=temperature)


def test_router_bias_rates_and_loads():
    bias = jnp.zeros((4,), jnp.float32)
    load = jnp.asarray([4.0, 0.0, 2.0, 2.0])
    # Independent reference: overloaded expert 0 goes down, underloaded expert 1 up.
    np.testing.assert_allclose(update_router_bias(bias, load, 0.5), [-0.5, 0.5, 0.0, 0.0])
    for rate in (-1e-3, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"update_router_bias: rate="):
            update_router_bias(bias, load, rate)
    nan_load = load.at[2].set(jnp.nan)
    with pytest.raises(ValueError, match=r"update_router_bias: load: got"):
        update_router_bias(bias, nan_load, 1e-3)
    # Under jit a NaN load moves no expert (documented).
    jitted = jax.jit(update_router_bias)
    np.testing.assert_array_equal(jitted(bias + 1.0, nan_load, 1e-3), np.ones(4))
    with input_checks.debug_checks():  # read while tracing: a fresh function, not `jitted`
        fresh = jax.jit(lambda b, load, rate: update_router_bias(b, load, rate))
        error, _ = checkify.checkify(fresh, errors=checkify.user_checks)(bias, nan_load, 1e-3)
    with pytest.raises(Exception, match="update_router_bias: load: a non-finite value"):
        error.throw()


def test_decode_cache_bytes_match_the_allocated_cache():
    """`generate` refuses prompt + max_tokens by this number before allocating anything."""
    cfg = config_lib.validate(_tiny()).model
    step = DecodeStep(cfg, num_tokens=cfg.vocab_size)
    for total in (3, 17):
        cache = step.empty_cache(total)
        allocated = sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
        assert step.cache_bytes(total) == allocated
    assert step.cache_bytes(10**9) > 10**12  # what --max_tokens=1000000000 would need
