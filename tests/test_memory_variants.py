"""OverEncoding, per-layer embeddings and UltraMem against straightforward numpy references, at the
default settings of their shipped configs (configs/tiny_overencoding.py, tiny_ple.py,
tiny_ultramem.py); causality and cached decoding of a model that has all three."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import accounting
from engram_jax import config as config_lib
from engram_jax.configs import config_path
from engram_jax.model import Transformer, overencoding_table_sizes
from engram_jax.optim import partition_params
from engram_jax.overencoding import OverEncoding, ngram_ids_device
from engram_jax.overencoding_ids import OverEncodingIds, ngram_ids_host
from engram_jax.ple import PerLayerInputs, PleInjection
from engram_jax.ultramem import UltraMem
from tests.test_model import _config

B, T = 2, 12


def _shipped(name: str) -> config_lib.Config:
    return config_lib.validate(config_lib.load_config_file(config_path(name)))


@pytest.fixture(scope="module")
def oe_cfg():
    return _shipped("tiny_overencoding").model


@pytest.fixture(scope="module")
def ple_cfg():
    return _shipped("tiny_ple").model


@pytest.fixture(scope="module")
def um_cfg():
    return _shipped("tiny_ultramem").model


def _segments() -> np.ndarray:
    seg = np.ones((B, T), np.int32)
    seg[0, 5:] = 2  # a document starts at position 5 of row 0
    return seg


# ------------------------------------------------------------------------------------------------
# OverEncoding.
# ------------------------------------------------------------------------------------------------


def _reference_ids(tokens, segments, vocab, max_ngram, k, moduli) -> np.ndarray:
    """Python integers: the window's base-V number, reduced modulo m at the end."""
    out = np.zeros(tokens.shape + (len(moduli),), np.int64)
    offsets = [sum(moduli[:i]) for i in range(len(moduli))]
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            for idx, m in enumerate(moduli):
                order = 2 + idx // k
                number = 0
                for j in range(order):
                    inside = t - j >= 0 and segments[b, t - j] == segments[b, t]
                    digit = int(tokens[b, t - j]) if inside else 0
                    number += digit * vocab**j
                out[b, t, idx] = number % m + offsets[idx]
    return out


def test_overencoding_ids_host_and_device_equal_big_integer_reference(oe_cfg):
    o = oe_cfg.overencoding
    moduli = overencoding_table_sizes(oe_cfg)
    assert moduli == tuple(o.base_rows + 2 * i + 1 for i in range(4))  # m + 2 idx + 1
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, oe_cfg.vocab_size, (B, T))
    seg = _segments()
    expected = _reference_ids(tokens, seg, oe_cfg.vocab_size, o.max_ngram, 2, moduli)
    spec = OverEncodingIds.from_model_config(oe_cfg)
    np.testing.assert_array_equal(spec(tokens, seg), expected)
    device = ngram_ids_device(
        jnp.asarray(tokens), jnp.asarray(seg), oe_cfg.vocab_size, o.max_ngram, 2, moduli
    )
    np.testing.assert_array_equal(np.asarray(device), expected)


def test_overencoding_ids_exact_near_uint32_limits():
    # A large vocabulary and a modulus of 2**31 - 1: the products overflow 32 bits unless reduced.
    vocab, moduli = 150_000, (2**31 - 1, 1_000_003)
    rng = np.random.default_rng(1)
    tokens = rng.integers(vocab - 50, vocab, (1, 6))
    expected = _reference_ids(tokens, np.ones((1, 6)), vocab, 3, 1, moduli)
    # Flat ids exceed int32 here, so compare per sub-table ids (offsets removed).
    expected = expected - np.array([0, moduli[0]])
    host = ngram_ids_host(tokens, None, vocab, 3, 1, moduli).astype(np.int64)
    device = np.asarray(ngram_ids_device(jnp.asarray(tokens), None, vocab, 3, 1, moduli))
    offsets = np.array([0, moduli[0]], np.int64)
    np.testing.assert_array_equal((host - offsets) % (2**32), expected % (2**32))
    np.testing.assert_array_equal((device.astype(np.int64) - offsets) % (2**32), expected % 2**32)


def _oe_module(cfg, max_ngram=None, decode=False) -> OverEncoding:
    o = cfg.overencoding
    n = max_ngram or o.max_ngram
    moduli = tuple(o.base_rows + 2 * i + 1 for i in range((n - 1) * o.tables_per_ngram))
    return OverEncoding(
        vocab_size=cfg.vocab_size,
        max_ngram=n,
        tables_per_ngram=o.tables_per_ngram,
        moduli=moduli,
        row_width=o.width(cfg.hidden_size),
        average=o.combine == "mean",
        decode=decode,
    )


def test_overencoding_embedding_equals_float64_reference(oe_cfg):
    module = _oe_module(oe_cfg)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, oe_cfg.vocab_size, (B, T))
    seg = _segments()
    embedded = rng.normal(size=(B, T, oe_cfg.hidden_size)).astype(np.float32)
    variables = module.init(jax.random.key(0), embedded, tokens, seg)
    out = np.asarray(module.apply(variables, embedded, tokens, seg))
    params = nn.meta.unbox(variables)["params"]
    table = np.asarray(params["table"], np.float64)
    proj = np.asarray(params["projection"], np.float64)  # [K, W, D]
    ids = _reference_ids(tokens, seg, oe_cfg.vocab_size, 3, 2, module.moduli)
    expected = embedded.astype(np.float64).copy()
    for idx in range(len(module.moduli)):
        expected += table[ids[..., idx]] @ proj[idx]
    expected /= 1 + len(module.moduli)  # combine = "mean"
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_overencoding_with_n_equal_1_is_the_token_embedding(oe_cfg):
    c = config_lib.load_config_file(config_path("tiny_overencoding"))
    c.model.overencoding.max_ngram = 1
    c.model.num_layers = 1
    c.model.moe.num_experts = 0
    cfg = config_lib.validate(c).model
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 5)).astype(np.int32)
    with_oe = Transformer(cfg)
    variables = with_oe.init(jax.random.key(0), tokens)
    assert "overencoding" not in variables["params"]
    c.model.overencoding.enabled = False
    without = Transformer(config_lib.validate(c).model)
    np.testing.assert_array_equal(
        np.asarray(with_oe.apply(variables, tokens)[0]),
        np.asarray(without.apply(variables, tokens)[0]),
    )
    # The module itself with N = 1 (no sub-table) returns the embedded tokens unchanged.
    module = _oe_module(cfg, max_ngram=1)
    embedded = np.random.default_rng(4).normal(size=(1, 5, cfg.hidden_size)).astype(np.float32)
    v = module.init(jax.random.key(0), embedded, tokens)
    np.testing.assert_array_equal(np.asarray(module.apply(v, embedded, tokens)), embedded)


# ------------------------------------------------------------------------------------------------
# Per-layer embeddings.
# ------------------------------------------------------------------------------------------------


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_ple_equals_float64_reference_and_foreign_ids_read_row_0(ple_cfg):
    layers, p, d = ple_cfg.num_layers, ple_cfg.ple.width, ple_cfg.hidden_size
    rows = 50  # a table smaller than the vocabulary: ids >= 50 read row 0
    inputs = PerLayerInputs(num_layers=layers, width=p, table_rows=rows, norm_eps=1e-6)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 100, (B, T))
    embedded = rng.normal(size=(B, T, d)).astype(np.float32)
    v = inputs.init(jax.random.key(0), embedded, tokens)
    ple = np.asarray(inputs.apply(v, embedded, tokens))  # [B, T, L, p]
    params = {k: np.asarray(x, np.float64) for k, x in nn.meta.unbox(v)["params"].items()}
    ids = np.where(tokens < rows, tokens, 0)
    table = params["table"][ids].reshape(B, T, layers, p) * math.sqrt(p)
    q = (embedded.astype(np.float64) @ params["projection"]) * d**-0.5
    q = _rms(q.reshape(B, T, layers, p), params["projection_norm"], 1e-6)
    expected = (q + table) / math.sqrt(2)
    np.testing.assert_allclose(ple, expected, rtol=1e-5, atol=1e-5)

    injection = PleInjection(width=p, norm_eps=1e-6)
    y = rng.normal(size=(B, T, d)).astype(np.float32)
    vi = injection.init(jax.random.key(1), y, ple[:, :, 1])
    u = np.asarray(injection.apply(vi, y, ple[:, :, 1]))
    pi = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), nn.meta.unbox(vi)["params"])
    g = _gelu_tanh((y * pi["input_scale"]) @ pi["gate"])
    expected_u = _rms((g * expected[:, :, 1]) @ pi["up"], pi["post_norm"]["scale"], 1e-6)
    np.testing.assert_allclose(u, expected_u, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# UltraMem.
# ------------------------------------------------------------------------------------------------


def _ultramem_reference(params, x, u, eps=1e-6):
    """float64 numpy: TDQKR with rank-1 preselection, top-k, multi-core IVE."""
    n, m, k = u.grid_size, u.candidates, u.top_k
    h = _rms(x.mean(axis=2), params["norm"]["scale"], eps)  # [B, T, D]
    q = np.einsum("btd,darc->btarc", h, params["query"])
    s = np.einsum("btarc,arnc->btarn", q, params["keys"]) / math.sqrt(u.key_dim)
    cores = params["cores"]
    uu, _, vt = np.linalg.svd(cores.mean(axis=0))
    u1, v1 = uu[:, 0], vt[0]
    sign = np.sign(u1[np.argmax(np.abs(u1))])
    u1, v1 = u1 * sign, v1 * sign
    p_rows = n * n // u.value_expansion
    b, t = x.shape[:2]
    out = np.zeros((b, t, x.shape[-1]))
    slots = np.zeros((b, t, k), np.int64)
    for bi in range(b):
        for ti in range(t):
            s_row, s_col = s[bi, ti, 0], s[bi, ti, 1]  # [r, n]
            rows = np.argsort(-(u1 @ s_row), kind="stable")[:m]
            cols = np.argsort(-(v1 @ s_col), kind="stable")[:m]
            per_core = {}
            for i in rows:
                for j in cols:
                    per_core[(i, j)] = np.array(
                        [s_row[:, i] @ c @ s_col[:, j] for c in cores]
                    )  # [H]
            ranked = sorted(per_core, key=lambda ij: -per_core[ij].mean())[:k]
            for rank, (i, j) in enumerate(ranked):
                slot = i * n + j
                slots[bi, ti, rank] = slot
                value = params["values"][slot % p_rows].reshape(u.num_cores, -1)
                weighted = (value * per_core[(i, j)][:, None]).reshape(-1)
                out[bi, ti] += weighted @ params["expansion"][slot // p_rows]
    return out, slots


def _ultramem_module(u) -> UltraMem:
    """The module at the config section's values (`model._ultramem` builds the same)."""
    fields = ("grid_size", "key_dim", "tucker_rank", "num_cores", "top_k", "candidates")
    return UltraMem(
        **{f: getattr(u, f) for f in fields},
        value_expansion=u.value_expansion,
        value_width=u.value_width,
    )


def test_ultramem_retrieval_and_output_equal_float64_reference(um_cfg):
    u = um_cfg.ultramem
    module = _ultramem_module(u)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(B, 3, 2, um_cfg.hidden_size)).astype(np.float32)
    v = module.init(jax.random.key(0), x)
    out, slots = module.apply(v, x, return_slots=True)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(v)["params"])
    expected, expected_slots = _ultramem_reference(params, x.astype(np.float64), u)
    np.testing.assert_array_equal(np.sort(np.asarray(slots), -1), np.sort(expected_slots, -1))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_ultramem_values_get_gradients_only_on_selected_rows(um_cfg):
    u = um_cfg.ultramem
    module = _ultramem_module(u)
    x = np.random.default_rng(7).normal(size=(1, 2, 1, um_cfg.hidden_size)).astype(np.float32)
    params = nn.meta.unbox(module.init(jax.random.key(0), x))["params"]
    _, slots = module.apply({"params": params}, x, return_slots=True)

    def loss(values):
        return jnp.sum(module.apply({"params": {**params, "values": values}}, x) ** 2)

    grads = np.asarray(jax.grad(loss)(params["values"]))
    touched = np.flatnonzero(np.abs(grads).sum(-1))
    selected = np.unique(np.asarray(slots) % u.value_rows)
    assert set(touched) <= set(selected) and len(touched) > 0


# ------------------------------------------------------------------------------------------------
# The model with all three: causality, cached decoding, accounting, the memory split.
# ------------------------------------------------------------------------------------------------


def _all_three(**extra):
    return _config(
        **{
            "engram.layer_ids": (),
            "overencoding.enabled": True,
            "overencoding.base_rows": 97,
            "ple.enabled": True,
            "ple.width": 8,
            "ultramem.layer_ids": (2,),
            "ultramem.grid_size": 8,
            "ultramem.candidates": 4,
            "ultramem.top_k": 4,
            "ultramem.value_width": 16,
            "ultramem.key_dim": 8,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def all_three():
    cfg = _all_three()
    model = Transformer(cfg)
    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    variables = nn.meta.unbox(model.init(jax.random.key(0), tokens))
    return cfg, model, jax.jit(model.apply), variables, tokens


def test_every_new_path_is_causal(all_three):
    cfg, _, forward, variables, tokens = all_three
    base = np.asarray(forward(variables, tokens)[0])
    t0 = 7
    changed = tokens.copy()
    changed[:, t0] = (changed[:, t0] + 1) % cfg.vocab_size
    after = np.asarray(forward(variables, changed)[0])
    np.testing.assert_array_equal(after[:, :t0], base[:, :t0])
    assert np.abs(after[:, t0:] - base[:, t0:]).max() > 0


def test_tables_are_memory_and_accounting_matches_the_tree(all_three):
    cfg, _, _, variables, _ = all_three
    _, memory = partition_params(variables["params"])
    assert set(memory) == {"overencoding", "ple", "layer_2"}
    assert set(memory["overencoding"]) == {"table"} and set(memory["ple"]) == {"table"}
    assert jax.tree_util.tree_structure(memory["layer_2"]) == jax.tree_util.tree_structure(
        {"ultramem": {"values": 0}}
    )
    counted = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    acc = accounting.account(cfg, T)
    assert acc.total_params == counted
    names = {c.name for c in acc.breakdown}
    assert {"overencoding_tables", "ple_table", "ultramem_values"} <= names


def test_shipped_configs_accounting_matches_eval_shape():
    for name in ("tiny_overencoding", "tiny_ple", "tiny_ultramem"):
        cfg = _shipped(name).model
        model = Transformer(cfg)
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 4), int)))
        counted = sum(x.size for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes["params"])))
        assert accounting.account(cfg, 128).total_params == counted, name


def test_cached_decoding_matches_full_forward(all_three):
    cfg, _, forward, variables, tokens = all_three
    model = Transformer(cfg, decode=True)
    # decode=True on a full-length input creates zero caches (OverEncoding: the token history).
    cache = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["cache"]
    cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
    assert set(cache["overencoding"]) == {"history"}
    full = np.asarray(forward(variables, tokens)[0])

    @jax.jit
    def step(cache, tokens_BT, positions_BT):
        (logits, _), updates = model.apply(
            {**variables, "cache": cache}, tokens_BT, positions_BT, mutable=["cache"]
        )
        return logits, updates["cache"]

    outputs, prefill = [], 4
    for start, stop in [(0, prefill)] + [(i, i + 1) for i in range(prefill, T)]:
        positions = np.broadcast_to(np.arange(start, stop, dtype=np.int32), (B, stop - start))
        logits, cache = step(cache, tokens[:, start:stop], positions)
        outputs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("overencoding.combine", "max", "model.overencoding.combine"),
        ("ultramem.value_expansion", 3, "model.ultramem.value_expansion"),
        ("ultramem.candidates", 100, "model.ultramem.candidates"),
        ("ultramem.value_width", 15, "model.ultramem.value_width"),
        ("ultramem.layer_ids", (9,), "model.ultramem.layer_ids"),
        ("ple.width", 0, "model.ple.width"),
    ],
)
def test_bad_values_name_the_field(key, value, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        _all_three(**{key: value})


def test_ultramem_delta_gradient_is_the_value_table_gradient(all_three):
    """The sparse step's route: the table read outside the gradient plus a zero delta on the rows
    read gives, scattered to the reported rows, the dense gradient of the value table."""
    cfg, model, _, variables, tokens = all_three
    params = variables["params"]
    table = params["layer_2"]["ultramem"]["values"]
    without = {**params, "layer_2": {**params["layer_2"]}}
    without["layer_2"]["ultramem"] = {
        k: v for k, v in params["layer_2"]["ultramem"].items() if k != "values"
    }
    u = cfg.ultramem

    def dense_loss(values):
        layer = {
            **params["layer_2"],
            "ultramem": {**params["layer_2"]["ultramem"], "values": values},
        }
        logits, _ = model.apply({**variables, "params": {**params, "layer_2": layer}}, tokens)
        return jnp.mean(logits**2)

    def delta_loss(delta):
        rows = {"ultramem/layer_2": {"values": table, "delta": delta}}
        logits, aux = model.apply({**variables, "params": without}, tokens, memory_rows=rows)
        return jnp.mean(logits**2), aux["ultramem_slots"][0]

    delta = jnp.zeros((B, T, u.top_k, u.value_width))
    dense = np.asarray(jax.grad(dense_loss)(table))
    grads, slots = jax.grad(delta_loss, has_aux=True)(delta)
    scattered = np.zeros_like(dense)
    np.add.at(
        scattered,
        np.asarray(slots).reshape(-1) % u.value_rows,
        np.asarray(grads).reshape(-1, u.value_width),
    )
    np.testing.assert_allclose(scattered, dense, rtol=1e-5, atol=1e-8)
    read = set((np.asarray(slots).reshape(-1) % u.value_rows).tolist())
    assert set(np.flatnonzero(np.abs(dense).sum(-1)).tolist()) <= read  # unread rows get none
