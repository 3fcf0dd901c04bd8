"""Tests for engram_jax.attention against numpy references written here (loops, float64)."""

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.attention import (
    Attention,
    MultiHeadLatentAttention,
    apply_rope,
    rope_frequencies,
)

B, T, D = 2, 16, 32
N, K, H = 4, 2, 8
THETA = 10000.0
MLA_DIMS = dict(num_heads=N, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------


def _reference_rope(x, positions, theta, rope_dim=None):
    """Rotate-half RoPE, pair (i, i + r/2) rotated by position * theta^(-2i/r); float64 loops."""
    x = np.asarray(x, np.float64)
    r = x.shape[-1] if rope_dim is None else rope_dim
    half = r // 2
    out = x.copy()
    for i in range(half):
        angle = np.asarray(positions, np.float64) * theta ** (-2.0 * i / r)  # [B, T]
        cos, sin = np.cos(angle)[:, :, None], np.sin(angle)[:, :, None]
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * cos - b * sin
        out[..., i + half] = a * sin + b * cos
    return out


def _reference_rms_norm(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * np.asarray(scale)


def _reference_softmax_attention(q, k, v, segment_ids, kv_head_of):
    """q [B,T,N,Hq], k [B,T,Nk,Hq], v [B,T,Nk,Hv]; causal, same-segment; loops over b, n, t."""
    b_, t_, n_, hq = q.shape
    out = np.zeros((b_, t_, n_, v.shape[-1]))
    for b in range(b_):
        for n in range(n_):
            kv = kv_head_of(n)
            for t in range(t_):
                keys = [s for s in range(t + 1) if segment_ids[b, s] == segment_ids[b, t]]
                logits = np.array([q[b, t, n] @ k[b, s, kv] for s in keys]) / np.sqrt(hq)
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
                out[b, t, n] = sum(p * v[b, s, kv] for p, s in zip(probs, keys, strict=True))
    return out


def _reference_gqa(params, x, positions, segment_ids, qk_norm_eps=None):
    """Grouped-query attention: query head n uses kv head n // (N // K)."""
    p = {name: np.asarray(value, np.float64) for name, value in params.items()}
    x = np.asarray(x, np.float64)
    q = np.einsum("btd,dnh->btnh", x, p["query"])
    k = np.einsum("btd,dkh->btkh", x, p["key"])
    v = np.einsum("btd,dkh->btkh", x, p["value"])
    if qk_norm_eps is not None:
        q = _reference_rms_norm(q, p["query_norm"], qk_norm_eps)
        k = _reference_rms_norm(k, p["key_norm"], qk_norm_eps)
    q, k = _reference_rope(q, positions, THETA), _reference_rope(k, positions, THETA)
    group = q.shape[2] // k.shape[2]
    out = _reference_softmax_attention(q, k, v, segment_ids, lambda n: n // group)
    return np.einsum("btnh,nhd->btd", out, p["out"])


def _reference_mla(params, x, positions, eps, q_lora_rank):
    """DeepSeek-V2 §2.1 MLA equations, written per token with plain matrix products."""
    p = {name: np.asarray(value, np.float64) for name, value in params.items()}
    x = np.asarray(x, np.float64)
    hn, hr = MLA_DIMS["qk_nope_head_dim"], MLA_DIMS["qk_rope_head_dim"]
    if q_lora_rank:
        c_q = _reference_rms_norm(x @ p["q_down"], p["q_norm"], eps)  # c^Q
        q = np.einsum("btl,lnh->btnh", c_q, p["q_up"])
    else:
        q = np.einsum("btd,dnh->btnh", x, p["q"])
    q_c, q_r = q[..., :hn], _reference_rope(q[..., hn:], positions, THETA)
    c_kv = _reference_rms_norm(x @ p["kv_down"], p["kv_norm"], eps)  # c^KV
    k_c = np.einsum("btl,lnh->btnh", c_kv, p["k_up"])  # W^UK c^KV
    v_c = np.einsum("btl,lnh->btnh", c_kv, p["v_up"])  # W^UV c^KV
    k_r = _reference_rope((x @ p["k_rope"])[:, :, None, :], positions, THETA)  # [B, T, 1, Hr]
    k_full = np.concatenate([k_c, np.repeat(k_r, N, axis=2)], axis=-1)
    q_full = np.concatenate([q_c, q_r], axis=-1)
    assert q_full.shape[-1] == hn + hr  # softmax scale is 1/sqrt(Hn + Hr) inside the helper
    segments = np.ones(x.shape[:2], np.int32)
    out = _reference_softmax_attention(q_full, k_full, v_c, segments, lambda n: n)
    return np.einsum("btnh,nhd->btd", out, p["out"])


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs():
    x_BTD = jax.random.normal(jax.random.key(0), (B, T, D), jnp.float32)
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return x_BTD, positions_BT


def _randomize_norms(params, key):
    """Norm gains start at one; make them random so the reference check covers them."""
    out = dict(params)
    for i, name in enumerate(sorted(n for n in params if n.endswith("norm"))):
        noise = jax.random.normal(jax.random.fold_in(key, i), params[name].shape)
        out[name] = 1.0 + 0.3 * noise
    return out


class _Setup(NamedTuple):
    """A module with its parameters and compiled functions, shared by the tests that use it."""

    model: nn.Module
    params: dict
    apply: Callable  # (params, x_BTD, positions_BT[, segment_ids_BT]) -> y_BTD, jitted
    step: Callable  # (params, cache, x_BTD, positions_BT) -> (y_BTD, {"cache": ...}), jitted
    empty_cache: dict


def _setup(model, x_BTD, positions_BT) -> _Setup:
    variables = model.init(jax.random.key(1), x_BTD, positions_BT)
    params = _randomize_norms(nn.unbox(variables["params"]), jax.random.key(2))
    decoder = model.clone(decode=True)
    # The cache protocol: eval_shape of a decode-mode init on a full-length input, then zeros.
    shapes = jax.eval_shape(decoder.init, jax.random.key(1), x_BTD, positions_BT)["cache"]
    empty_cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nn.unbox(shapes))

    def apply(p, x, pos, seg=None):
        return model.apply({"params": p}, x, pos, seg)

    def step(p, cache, x, pos):
        return decoder.apply({"params": p, "cache": cache}, x, pos, mutable=["cache"])

    return _Setup(model, params, jax.jit(apply), jax.jit(step), empty_cache)


@pytest.fixture(scope="module")
def gqa(inputs):
    return _setup(Attention(num_heads=N, num_kv_heads=K, head_dim=H), *inputs)


@pytest.fixture(scope="module")
def mla(inputs):
    return _setup(MultiHeadLatentAttention(**MLA_DIMS, q_lora_rank=10, norm_eps=1e-5), *inputs)


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------


def test_rope_frequencies_values():
    np.testing.assert_allclose(
        np.asarray(rope_frequencies(8, 100.0)), [1.0, 100**-0.25, 100**-0.5, 100**-0.75], rtol=1e-6
    )


@pytest.mark.parametrize("rope_dim", [None, 4])
def test_rope_matches_reference(rope_dim):
    x = jax.random.normal(jax.random.key(3), (B, T, 3, H))
    positions = jax.random.randint(jax.random.key(4), (B, T), 0, 5000)
    got = apply_rope(x, positions, THETA, rope_dim)
    want = _reference_rope(x, positions, THETA, rope_dim)
    # f32 angles at positions up to 5000: absolute error ~ 5000 * 2^-24 radians, times |x| ~ 3.
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-3, rtol=0)
    if rope_dim is not None:
        np.testing.assert_array_equal(
            np.asarray(got[..., rope_dim:]), np.asarray(x[..., rope_dim:])
        )


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(5), (1, 1, 1, H))
    k = jax.random.normal(jax.random.key(6), (1, 1, 1, H))

    def score(pq, pk):
        rq = apply_rope(q, jnp.array([[pq]], jnp.int32), THETA)
        rk = apply_rope(k, jnp.array([[pk]], jnp.int32), THETA)
        return float(jnp.sum(rq * rk))

    base = score(7, 3)
    for shift in (1, 50, 1000):
        assert score(7 + shift, 3 + shift) == pytest.approx(base, abs=1e-4)
    assert abs(score(8, 3) - base) > 1e-3  # a different offset does change the score


def test_rope_bad_inputs():
    x = jnp.zeros((B, T, 2, H))
    with pytest.raises(ValueError, match="positions"):
        apply_rope(x, jnp.zeros((B, T + 1), jnp.int32), THETA)
    with pytest.raises(TypeError, match="positions"):
        apply_rope(x, jnp.zeros((B, T), jnp.float32), THETA)
    with pytest.raises(ValueError, match="rope_dim=3"):
        apply_rope(x, jnp.zeros((B, T), jnp.int32), THETA, rope_dim=3)


# ---------------------------------------------------------------------------------------------
# Grouped-query attention
# ---------------------------------------------------------------------------------------------


def test_param_shapes(inputs):
    model = Attention(num_heads=N, num_kv_heads=K, head_dim=H, use_qk_norm=True)
    shapes = jax.tree.map(
        jnp.shape, nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))
    )
    assert shapes["params"] == {
        "query": (D, N, H),
        "key": (D, K, H),
        "value": (D, K, H),
        "out": (N, H, D),
        "query_norm": (H,),
        "key_norm": (H,),
    }


def test_gqa_matches_reference(gqa, inputs):
    x, positions = inputs
    want = _reference_gqa(gqa.params, x, positions, np.ones((B, T), np.int32))
    got = gqa.apply(gqa.params, x, positions)
    # f32 vs float64 reference over sums of ~D*H terms of size ~1: 1e-4 is a few hundred ulps.
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_qk_norm_matches_reference(inputs):
    model = Attention(num_heads=N, num_kv_heads=K, head_dim=H, use_qk_norm=True, qk_norm_eps=1e-5)
    x, positions = inputs
    params = _randomize_norms(
        nn.unbox(model.init(jax.random.key(1), x, positions)["params"]), jax.random.key(2)
    )
    got = model.apply({"params": params}, x, positions)
    want = _reference_gqa(params, x, positions, np.ones((B, T), np.int32), qk_norm_eps=1e-5)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_causality(gqa, inputs):
    params, apply = gqa.params, gqa.apply
    x, positions = inputs
    t = 6
    y = apply(params, x, positions)
    x_perturbed = x.at[:, t + 1 :].add(jax.random.normal(jax.random.key(7), (B, T - t - 1, D)))
    y_perturbed = apply(params, x_perturbed, positions)
    np.testing.assert_array_equal(np.asarray(y[:, : t + 1]), np.asarray(y_perturbed[:, : t + 1]))
    assert not np.allclose(np.asarray(y[:, t + 1 :]), np.asarray(y_perturbed[:, t + 1 :]))


def test_packed_segments_are_independent(gqa, inputs):
    params, apply = gqa.params, gqa.apply
    x, _ = inputs
    split = 6  # document A = tokens [0, 6), document B = [6, 16), positions restart at 0
    positions = jnp.concatenate([jnp.arange(split), jnp.arange(T - split)]).astype(jnp.int32)
    positions_BT = jnp.broadcast_to(positions, (B, T))
    segments_BT = jnp.broadcast_to((jnp.arange(T) >= split).astype(jnp.int32) + 1, (B, T))
    packed = apply(params, x, positions_BT, segments_BT)
    alone_a = apply(params, x[:, :split], positions_BT[:, :split])
    alone_b = apply(params, x[:, split:], positions_BT[:, split:])
    np.testing.assert_allclose(np.asarray(packed[:, :split]), np.asarray(alone_a), atol=1e-6)
    np.testing.assert_allclose(np.asarray(packed[:, split:]), np.asarray(alone_b), atol=1e-6)
    # And the reference agrees with the packed result.
    want = _reference_gqa(params, x, positions_BT, np.asarray(segments_BT))
    np.testing.assert_allclose(np.asarray(packed), want, atol=1e-4, rtol=1e-4)


def test_bf16_close_to_f32(gqa, inputs):
    x, positions = inputs
    model = gqa.model.clone(dtype=jnp.bfloat16)
    y16 = model.apply({"params": gqa.params}, x, positions)
    assert y16.dtype == jnp.bfloat16
    y32 = np.asarray(gqa.apply(gqa.params, x, positions))
    # bf16 has 8 mantissa bits (rel. 4e-3 per op); outputs are O(1), so 5e-2 absolute is generous
    # yet far below the spread of the outputs (std ~0.5).
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=5e-2, rtol=0)


def _decode(setup, x, positions, prefill):
    """Prefill `prefill` tokens as one chunk (if > 0), then decode one token per step."""
    cache = setup.empty_cache
    outputs = []
    bounds = ([(0, prefill)] if prefill else []) + [(t, t + 1) for t in range(prefill, T)]
    for lo, hi in bounds:
        y, mutated = setup.step(setup.params, cache, x[:, lo:hi], positions[:, lo:hi])
        cache = mutated["cache"]
        outputs.append(y)
    return jnp.concatenate(outputs, axis=1), cache


@pytest.mark.parametrize("prefill", [0, 10])
def test_gqa_cached_decoding_matches_full(gqa, inputs, prefill):
    x, positions = inputs
    assert gqa.empty_cache["cached_key"].shape == (B, T, K, H)
    got, cache = _decode(gqa, x, positions, prefill)
    assert int(cache["cache_index"]) == T
    want = gqa.apply(gqa.params, x, positions)
    # Same f32 arithmetic in a different order (masked cache slots vs causal mask).
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_bad_inputs_name_the_field(inputs):
    x, positions = inputs
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        Attention(num_heads=4, num_kv_heads=3, head_dim=H).init(jax.random.key(0), x, positions)
    model = Attention(num_heads=N, num_kv_heads=K, head_dim=H)
    with pytest.raises(ValueError, match="x has shape"):
        model.init(jax.random.key(0), x[0], positions)
    with pytest.raises(ValueError, match="positions has shape"):
        model.init(jax.random.key(0), x, positions[:, :-1])
    with pytest.raises(ValueError, match="segment_ids has shape"):
        model.init(jax.random.key(0), x, positions, jnp.zeros((B,), jnp.int32))
    decoder = model.clone(decode=True)
    variables = decoder.init(jax.random.key(0), x[:, :4], positions[:, :4])
    with pytest.raises(ValueError, match="max_len=4"):
        decoder.apply(variables, x, positions, mutable=["cache"])


# ---------------------------------------------------------------------------------------------
# Multi-head latent attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_lora_rank", [None, 10])
def test_mla_matches_reference(mla, inputs, q_lora_rank):
    x, positions = inputs
    if q_lora_rank:
        params, got = mla.params, mla.apply(mla.params, x, positions)
    else:
        model = mla.model.clone(q_lora_rank=q_lora_rank)
        params = nn.unbox(model.init(jax.random.key(1), x, positions)["params"])
        params = _randomize_norms(params, jax.random.key(2))
        got = model.apply({"params": params}, x, positions)
    want = _reference_mla(params, x, positions, 1e-5, q_lora_rank)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_mla_param_shapes(inputs):
    model = MultiHeadLatentAttention(**MLA_DIMS, q_lora_rank=10)
    shapes = jax.tree.map(
        jnp.shape, nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))
    )
    assert shapes["params"] == {
        "q_down": (D, 10),
        "q_norm": (10,),
        "q_up": (10, N, 12),
        "kv_down": (D, 12),
        "kv_norm": (12,),
        "k_rope": (D, 4),
        "k_up": (12, N, 8),
        "v_up": (12, N, 6),
        "out": (N, 6, D),
    }


@pytest.mark.parametrize("prefill", [0, 5])
def test_mla_cached_decoding_matches_full(mla, inputs, prefill):
    x, positions = inputs
    # The cache holds the latent and the shared rope key, not per-head keys/values.
    assert jax.tree.map(jnp.shape, mla.empty_cache) == {
        "cached_latent": (B, T, MLA_DIMS["kv_lora_rank"]),
        "cached_key_rope": (B, T, MLA_DIMS["qk_rope_head_dim"]),
        "cache_index": (),
    }
    got, cache = _decode(mla, x, positions, prefill)
    assert int(cache["cache_index"]) == T
    want = mla.apply(mla.params, x, positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_mla_causality_and_bad_fields(mla, inputs):
    x, positions = inputs
    y = mla.apply(mla.params, x, positions)
    y_perturbed = mla.apply(mla.params, x.at[:, 9:].set(0.0), positions)
    np.testing.assert_array_equal(np.asarray(y[:, :9]), np.asarray(y_perturbed[:, :9]))
    bad = MultiHeadLatentAttention(**{**MLA_DIMS, "qk_rope_head_dim": 3})
    with pytest.raises(ValueError, match="qk_rope_head_dim=3"):
        bad.init(jax.random.key(0), x, positions)


def test_nnx_bridge(inputs):
    x, positions = inputs
    # Logical-axis annotations need a mesh under NNX's default eager sharding; none here.
    with nnx.use_eager_sharding(False):
        layer = nnx.bridge.ToNNX(
            Attention(num_heads=N, num_kv_heads=K, head_dim=H), rngs=nnx.Rngs(0)
        ).lazy_init(x, positions)
        assert layer(x, positions).shape == (B, T, D)
