"""Tests for engram_jax.engram (and the row-sharded lookup in engram_jax.sharding).

One small config (B=2, T=16, G=2, D=32, 2 orders x 4 heads, W=8) and module-level jitted functions
keep the file fast. The numpy reference below is an independent float64 transcription of
docs/design.md §1.4-1.6.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax import engram as E
from engram_jax.engram import Engram
from tests.multidevice import run_with_devices

SIZES = (11, 13, 17, 19, 23, 29, 31, 37)  # 2 orders x 4 heads; R = 180
MAX_NGRAM = 3  # dilation 3: taps t, t-3, t-6, t-9
B, T, G, D, W = 2, 16, 2, 32, 8
M = len(SIZES)
# f32 layer vs float64 reference: a few ulps through two projections, three norms and a conv.
F32_TOL = dict(rtol=2e-5, atol=2e-5)

MODEL = Engram(head_vocab_sizes=SIZES, max_ngram=MAX_NGRAM, row_width=W)
DECODER = MODEL.clone(decode=True)


def _make_ids(rng: np.random.Generator, b: int = B, t: int = T) -> np.ndarray:
    return np.stack([rng.integers(0, p, size=(b, t)) for p in SIZES], axis=-1).astype(np.int32)


@functools.cache
def _data():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(B, T, G, D)).astype(np.float32)
    ids = _make_ids(rng)
    params0 = nn.unbox(MODEL.init(jax.random.key(0), hidden, ids)["params"])
    # Nonzero conv kernel and non-unit gains so the reference exercises every parameter.
    params = dict(params0)
    params["conv_kernel"] = jnp.asarray(rng.normal(size=(4, G, D)).astype(np.float32) * 0.5)
    for name in ("key_norm_scale", "query_norm_scale", "conv_norm_scale"):
        params[name] = jnp.asarray(1.0 + 0.3 * rng.normal(size=(G, D)).astype(np.float32))
    return hidden, ids, params0, params


@jax.jit
def _apply_ids(params, hidden, ids):
    return MODEL.apply({"params": params}, hidden, ids, return_gates=True)


@jax.jit
def _apply_segments(params, hidden, ids, segment_ids):
    return MODEL.apply({"params": params}, hidden, ids, segment_ids=segment_ids)


@jax.jit
def _apply_rows(params, hidden, rows):
    return MODEL.apply({"params": params}, hidden, rows=rows)


@jax.jit
def _grads(params, hidden, ids, cotangent):
    def loss(p, h):
        return jnp.sum(MODEL.apply({"params": p}, h, ids) * cotangent)

    return jax.grad(loss, argnums=(0, 1))(params, hidden)


# ------------------------------------------------------------------------------------------------
# Independent numpy reference (float64).
# ------------------------------------------------------------------------------------------------


def _ref_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _ref_gated(params, hidden, ids):
    """V~ and gates: lookup, projections, RMSNorms, signed-sqrt sigmoid gate (§1.4-1.5)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h = np.asarray(hidden, np.float64)
    offsets = np.concatenate([[0], np.cumsum(SIZES)[:-1]])
    e = p["table"][np.asarray(ids) + offsets].reshape(B, -1, M * W)  # head-major flatten
    v = e @ p["value_kernel"] + p["value_bias"]
    gated = np.zeros(h.shape)
    gates = np.zeros(h.shape[:3])
    for g in range(G):
        k = e @ p["key_kernel"][:, g, :] + p["key_bias"][g]
        kn = _ref_rms(k, p["key_norm_scale"][g], E.TORCH_F32_EPS)
        qn = _ref_rms(h[:, :, g], p["query_norm_scale"][g], E.TORCH_F32_EPS)
        s = np.sum(kn * qn, axis=-1) / math.sqrt(D)
        s = np.sign(s) * np.sqrt(np.maximum(np.abs(s), 1e-6))
        gates[:, :, g] = 1.0 / (1.0 + np.exp(-s))
        gated[:, :, g] = gates[:, :, g, None] * v
    return gated, gates


def _ref_conv(x, w, dilation, seg=None):
    """y[t, c] = sum_i w[c, i] x[t - (K-1-i) dilation, c], written as loops over t and taps."""
    b, t, c = x.shape
    k = w.shape[1]
    y = np.zeros(x.shape)
    for bi in range(b):
        for ti in range(t):
            for i in range(k):
                src = ti - (k - 1 - i) * dilation
                if src < 0 or (seg is not None and seg[bi, src] != seg[bi, ti]):
                    continue
                y[bi, ti] += w[:, i] * x[bi, src]
    return y


def _reference_engram(params, hidden, ids, seg=None):
    gated, gates = _ref_gated(params, hidden, ids)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    t = hidden.shape[1]
    normed = np.concatenate(
        [_ref_rms(gated[:, :, g], p["conv_norm_scale"][g], 1e-5) for g in range(G)], axis=-1
    )  # stream-major channels
    w = np.stack([p["conv_kernel"][i].reshape(G * D) for i in range(4)], axis=1)  # [C, K]
    conv = _ref_conv(normed, w, MAX_NGRAM, seg)
    silu = conv / (1.0 + np.exp(-conv))
    return gated + silu.reshape(B, t, G, D), gates


# ------------------------------------------------------------------------------------------------
# Pure functions.
# ------------------------------------------------------------------------------------------------


def test_signed_sqrt_three_way_sign_and_finite_gradient_at_zero():
    x = jnp.array([-4.0, -1e-8, 0.0, 1e-8, 4.0])
    np.testing.assert_allclose(E.signed_sqrt(x, 1e-6), [-2.0, -1e-3, 0.0, 1e-3, 2.0], rtol=1e-6)
    grad0 = jax.grad(lambda s: E.signed_sqrt(s, 1e-6))(0.0)
    assert float(grad0) == 0.0
    assert float(jax.nn.sigmoid(E.signed_sqrt(jnp.float32(0.0)))) == 0.5


def test_causal_short_conv_tap_order_and_dilation():
    rng = np.random.default_rng(1)
    kernel_KC = rng.normal(size=(4, 3)).astype(np.float32)
    x_BTC = np.zeros((1, 16, 3), np.float32)
    x_BTC[0, 2] = 1.0  # impulse at t=2: y[2 + (3 - i) * 3] = kernel[i]
    y = np.asarray(E.causal_short_conv(jnp.asarray(x_BTC), jnp.asarray(kernel_KC), 3))
    expected = np.zeros_like(x_BTC)
    for i in range(4):
        expected[0, 2 + (3 - i) * 3] = kernel_KC[i]
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-7)
    x2 = rng.normal(size=(2, 16, 3))
    seg = np.repeat(np.array([[0] * 5 + [1] * 11]), 2, axis=0)
    got = E.causal_short_conv(
        jnp.asarray(x2, jnp.float32), jnp.asarray(kernel_KC), 2, jnp.asarray(seg)
    )
    np.testing.assert_allclose(got, _ref_conv(x2, kernel_KC.T, 2, seg), **F32_TOL)


def test_causal_short_conv_step_matches_full():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 12, 5)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(4, 5)).astype(np.float32))
    full = E.causal_short_conv(x, kernel, 3)
    state = jnp.zeros((2, 9, 5))
    y1, state = E.causal_short_conv_step(x[:, :7], state, kernel, 3)
    y2, state = E.causal_short_conv_step(x[:, 7:], state, kernel, 3)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), full, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(state, x[:, 3:])


def test_lookup_rows_out_of_range_reads_zero_under_jit():
    table = jnp.arange(180 * 2, dtype=jnp.float32).reshape(180, 2)
    ids = np.zeros((1, 2, M), np.int32)
    ids[0, 0, 1] = SIZES[1]  # one past head 1: would read head 2's first row if unmasked
    ids[0, 1, 3] = -1  # negative: would wrap to the last row
    offsets = E.head_offsets(SIZES)
    rows = jax.jit(lambda t, i: E.lookup_rows(t, i, offsets, head_vocab_sizes=SIZES))(table, ids)
    np.testing.assert_array_equal(rows[0, 0, 1], [0.0, 0.0])
    np.testing.assert_array_equal(rows[0, 1, 3], [0.0, 0.0])
    np.testing.assert_array_equal(rows[0, 0, 0], table[0])
    np.testing.assert_array_equal(rows[0, 0, 2], table[offsets[2]])


def test_validate_hash_ids_names_head_and_value():
    ids = _make_ids(np.random.default_rng(3))
    E.validate_hash_ids(ids, SIZES)
    ids[1, 5, 6] = SIZES[6]
    with pytest.raises(
        ValueError, match=r"hash_ids\[1, 5, 6\] = 31 .*head 6.*head_vocab_sizes\[6\] = 31"
    ):
        E.validate_hash_ids(ids, SIZES)
    with pytest.raises(TypeError, match="hash_ids has dtype float32"):
        E.validate_hash_ids(ids.astype(np.float32), SIZES)


# ------------------------------------------------------------------------------------------------
# The module.
# ------------------------------------------------------------------------------------------------


def test_param_shapes_and_logical_axes():
    hidden, ids, _, _ = _data()
    boxed = jax.eval_shape(MODEL.init, jax.random.key(0), hidden, ids)["params"]
    shapes = {k: v.value.shape for k, v in boxed.items()}
    assert shapes == {
        "table": (sum(SIZES), W),
        "key_kernel": (M * W, G, D),
        "key_bias": (G, D),
        "value_kernel": (M * W, D),
        "value_bias": (D,),
        "key_norm_scale": (G, D),
        "query_norm_scale": (G, D),
        "conv_norm_scale": (G, D),
        "conv_kernel": (4, G, D),
    }
    assert boxed["table"].names == ("table_rows", "memory_width")
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in boxed.values())
    padded = MODEL.clone(table_row_multiple=64)
    assert jax.eval_shape(padded.init, jax.random.key(0), hidden, ids)["params"][
        "table"
    ].value.shape == (
        192,
        W,
    )


def test_init_matches_torch_defaults():
    _, _, params0, _ = _data()
    bound = 1.0 / math.sqrt(M * W)
    for name in ("key_kernel", "key_bias", "value_kernel", "value_bias"):
        x = np.asarray(params0[name])
        assert np.abs(x).max() <= bound and np.abs(x).max() > 0.8 * bound, name
    np.testing.assert_array_equal(params0["conv_kernel"], 0.0)
    assert 0.8 < float(np.std(params0["table"])) < 1.2  # N(0, 1), 1440 samples


def test_shapes_gate_range_and_zero_init_output_is_gated_value():
    hidden, ids, params0, _ = _data()
    out, gates = _apply_ids(params0, hidden, ids)
    assert out.shape == (B, T, G, D) and gates.shape == (B, T, G)
    assert gates.dtype == jnp.float32
    assert float(gates.min()) > 0.0 and float(gates.max()) < 1.0
    # Zero conv kernel: SiLU(0) = 0, so Y = V~ = gate * value.
    gated, ref_gates = _ref_gated(params0, hidden, ids)
    np.testing.assert_allclose(gates, ref_gates, **F32_TOL)
    np.testing.assert_allclose(out, gated, **F32_TOL)


def test_matches_numpy_reference_with_nonzero_conv():
    hidden, ids, _, params = _data()
    out, gates = _apply_ids(params, hidden, ids)
    ref_out, ref_gates = _reference_engram(params, hidden, ids)
    np.testing.assert_allclose(gates, ref_gates, **F32_TOL)
    np.testing.assert_allclose(out, ref_out, **F32_TOL)


def test_jit_matches_no_jit_and_sow():
    hidden, ids, _, params = _data()
    eager, state = MODEL.apply({"params": params}, hidden, ids, mutable=["intermediates"])
    jitted, gates = _apply_ids(params, hidden, ids)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state["intermediates"]["gates"][0], gates, rtol=1e-6, atol=1e-7)


def test_zero_query_gives_gate_half_and_finite_grads():
    hidden, ids, _, params = _data()
    hidden = hidden.copy()
    hidden[0, 3, 1] = 0.0  # an all-zero query row (padding)
    hidden[1, :, 0] = 0.0
    _, gates = _apply_ids(params, hidden, ids)
    assert float(gates[0, 3, 1]) == 0.5
    np.testing.assert_array_equal(gates[1, :, 0], 0.5)
    cot = np.random.default_rng(4).normal(size=(B, T, G, D)).astype(np.float32)
    gparams, ghidden = _grads(params, hidden, ids, cot)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((gparams, ghidden)))
    assert float(jnp.abs(ghidden).max()) > 0  # gradients flow (and the test could fail)


def test_gradients_reach_exactly_the_looked_up_rows():
    hidden, ids, _, params = _data()
    ids = ids.copy()
    ids[:, :, 0] = ids[0, 0, 0]  # head 0 reads one row only, so many rows stay untouched
    cot = np.random.default_rng(5).normal(size=(B, T, G, D)).astype(np.float32)
    gparams, _ = _grads(params, hidden, ids, cot)
    touched = np.flatnonzero(np.any(np.asarray(gparams["table"]) != 0, axis=1))
    looked_up = np.unique(ids + E.head_offsets(SIZES))
    np.testing.assert_array_equal(touched, looked_up)


def test_causality_under_perturbation_of_next_token():
    hidden, ids, _, params = _data()
    base, _ = _apply_ids(params, hidden, ids)
    rng = np.random.default_rng(6)
    for t in (0, 5, 12):
        h2, i2 = hidden.copy(), ids.copy()
        h2[:, t + 1] += rng.normal(size=(B, G, D)).astype(np.float32)
        i2[:, t + 1] = _make_ids(rng, t=1)[:, 0]
        out, _ = _apply_ids(params, h2, i2)
        np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
        assert float(jnp.abs(out[:, t + 1] - base[:, t + 1]).max()) > 1e-3
        if t + 1 + MAX_NGRAM < T:  # reaches t+1+δ through the dilated conv
            delta = out[:, t + 1 + MAX_NGRAM] - base[:, t + 1 + MAX_NGRAM]
            assert float(jnp.abs(delta).max()) > 1e-4


def test_bf16_compute_close_to_f32():
    hidden, ids, _, params = _data()
    ref, ref_gates = _apply_ids(params, hidden, ids)
    bf16 = MODEL.clone(dtype=jnp.bfloat16)
    out, gates = jax.jit(lambda p, h, i: bf16.apply({"params": p}, h, i, return_gates=True))(
        params, hidden, ids
    )
    assert out.dtype == jnp.bfloat16 and gates.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits (rel. 4e-3 per rounding); outputs are O(1).
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=0.05, atol=0.05)
    np.testing.assert_allclose(gates, ref_gates, atol=0.02)


def test_rows_mode_equals_ids_mode():
    hidden, ids, _, params = _data()
    out_ids, _ = _apply_ids(params, hidden, ids)
    rows = np.asarray(params["table"])[ids + E.head_offsets(SIZES)]  # [B, T, M, W] on the host
    np.testing.assert_allclose(_apply_rows(params, hidden, rows), out_ids, rtol=1e-6, atol=1e-6)
    # Rows-only init creates no table: the host-offload path keeps it elsewhere.
    init_rows = jax.eval_shape(MODEL.init, jax.random.key(0), hidden, rows=rows)["params"]
    assert "table" not in init_rows and "key_kernel" in init_rows


def test_segment_ids_isolate_packed_documents():
    hidden, ids, _, params = _data()
    len_a = 7  # doc A at [0, 7), doc B at [7, 16) packed; B alone at [0, 9)
    len_b = T - len_a
    rng = np.random.default_rng(7)
    packed_h, packed_i = hidden.copy(), ids.copy()
    alone_h = rng.normal(size=hidden.shape).astype(np.float32)  # positions >= len_b: other content
    alone_i = _make_ids(rng)
    alone_h[:, :len_b], alone_i[:, :len_b] = packed_h[:, len_a:], packed_i[:, len_a:]
    packed_seg = np.broadcast_to(np.array([0] * len_a + [1] * len_b), (B, T))
    alone_seg = np.broadcast_to(np.array([1] * len_b + [2] * len_a), (B, T))
    packed = _apply_segments(params, packed_h, packed_i, packed_seg)
    alone = _apply_segments(params, alone_h, alone_i, alone_seg)
    np.testing.assert_allclose(packed[:, len_a:], alone[:, :len_b], rtol=1e-6, atol=1e-6)
    ref, _ = _reference_engram(params, packed_h, packed_i, seg=packed_seg)
    np.testing.assert_allclose(packed, ref, **F32_TOL)
    # Without segment ids doc A leaks into B through the conv (so the check above can fail).
    leaky, _ = _apply_ids(params, packed_h, packed_i)
    assert float(jnp.abs(leaky[:, len_a:] - alone[:, :len_b]).max()) > 1e-3


@jax.jit
def _decode_step(params, cache, hidden, ids):
    out, state = DECODER.apply({"params": params, "cache": cache}, hidden, ids, mutable=["cache"])
    return out, state["cache"]


def test_decode_step_by_step_equals_full_forward():
    hidden, ids, _, params = _data()
    full, _ = _apply_ids(params, hidden, ids)
    # Cache protocol: the first decode=True call without a cache creates a zero cache.
    cache = DECODER.init(jax.random.key(0), hidden[:, :1], ids[:, :1])["cache"]
    assert cache["conv_state"].shape == (B, 3 * MAX_NGRAM, G * D)
    prefill = 5
    out, cache = _decode_step(params, cache, hidden[:, :prefill], ids[:, :prefill])
    outs = [out]
    for t in range(prefill, T):
        out, cache = _decode_step(params, cache, hidden[:, t : t + 1], ids[:, t : t + 1])
        outs.append(out)
    assert int(cache["index"]) == T
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_nnx_bridge_matches_linen():
    hidden, ids, _, _ = _data()
    # No mesh here: turn off NNX eager sharding of the logical annotations (it needs a mesh).
    with nnx.use_eager_sharding(False):
        model = nnx.bridge.ToNNX(MODEL, rngs=nnx.Rngs(0)).lazy_init(hidden, ids)
        out = model(hidden, ids)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, nn.unbox(jax.eval_shape(MODEL.init, jax.random.key(0), hidden, ids))["params"]
    )
    ref, _ = _apply_ids(params, hidden, ids)
    assert out.shape == (B, T, G, D)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def _bad_inputs():
    rng = np.random.default_rng(8)
    hidden = rng.normal(size=(B, T, G, D)).astype(np.float32)
    ids = _make_ids(rng)
    rows = np.zeros((B, T, M, W), np.float32)
    out_of_range = ids.copy()
    out_of_range[0, 2, 4] = 40
    return [
        (
            (hidden[..., 0], ids),
            {},
            ValueError,
            r"hidden has shape \(2, 16, 2\); expected \[B, T, G, D\]",
        ),
        (
            (hidden, ids[..., 0]),
            {},
            ValueError,
            r"hash_ids has shape \(2, 16\); expected \[B, T, M\]",
        ),
        (
            (hidden, ids[:, :, :6]),
            {},
            ValueError,
            r"hash_ids has shape \(2, 16, 6\); expected .* M=8 \(orders=2 x heads=4\)",
        ),
        ((hidden, ids[:, :8]), {}, ValueError, r"hash_ids has shape \(2, 8, 8\); expected"),
        ((hidden, ids[:1]), {}, ValueError, r"hash_ids has shape \(1, 16, 8\)"),
        (
            (hidden, ids.astype(np.float32)),
            {},
            TypeError,
            "hash_ids has dtype float32; expected int32",
        ),
        (
            (hidden, out_of_range),
            {},
            ValueError,
            r"hash_ids\[0, 2, 4\] = 40 is out of range for head 4",
        ),
        ((hidden,), {}, ValueError, "exactly one of hash_ids .* and rows .*; got neither"),
        ((hidden, ids), {"rows": rows}, ValueError, "got both"),
        ((hidden,), {"rows": rows[:, :, :, :4]}, ValueError, r"rows has shape \(2, 16, 8, 4\)"),
        ((hidden, ids), {"segment_ids": np.zeros((B,))}, ValueError, "segment_ids has shape"),
        ((hidden.astype(np.int32), ids), {}, TypeError, "hidden has dtype int32"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_inputs_raise_named_errors(case):
    hidden, ids, _, params = _data()
    args, kwargs, exc, pattern = _bad_inputs()[case]
    with pytest.raises(exc, match=pattern):
        MODEL.apply({"params": params}, *args, **kwargs)


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"head_vocab_sizes": SIZES[:7]}, "head_vocab_sizes has 7 entries"),
        ({"max_ngram": 1}, "max_ngram is 1"),
        ({"row_width": 0}, "row_width is 0"),
        ({"head_vocab_sizes": (0,) + SIZES[1:]}, "expected positive sizes"),
    ],
)
def test_bad_fields_raise_named_errors(fields, pattern):
    hidden, ids, _, _ = _data()
    with pytest.raises(ValueError, match=pattern):
        jax.eval_shape(MODEL.clone(**fields).init, jax.random.key(0), hidden, ids)


def test_decode_rejects_segment_ids():
    hidden, ids, _, _ = _data()
    with pytest.raises(ValueError, match="segment_ids is not supported with decode=True"):
        DECODER.init(jax.random.key(0), hidden, ids, segment_ids=np.zeros((B, T), np.int32))


# ------------------------------------------------------------------------------------------------
# Row-sharded lookup on 8 simulated devices.
# ------------------------------------------------------------------------------------------------

_SHARDED_CODE = """
import json, re
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from engram_jax.engram import Engram
from engram_jax.sharding import make_mesh, vocab_parallel_lookup

sizes = (11, 13, 17, 19, 23, 29, 31, 37)  # R = 180, padded to 184 rows (4 shards of 46)
B, T, G, D, W = 4, 8, 2, 16, 8
rng = np.random.default_rng(0)
hidden = rng.normal(size=(B, T, G, D)).astype(np.float32)
ids = np.stack([rng.integers(0, p, size=(B, T)) for p in sizes], -1).astype(np.int32)
base = Engram(head_vocab_sizes=sizes, max_ngram=3, row_width=W, table_row_multiple=8,
              conv_zero_init=False)
params = nn.unbox(base.init(jax.random.key(0), hidden, ids)["params"])
R = params["table"].shape[0]

def loss_and_grads(model):
    def loss(p, h, i):
        return jnp.sum(jnp.square(model.apply({"params": p}, h, i)))
    return jax.jit(jax.value_and_grad(loss))

ref_loss, ref_grads = loss_and_grads(base)(params, hidden, ids)
ref_out = base.apply({"params": params}, hidden, ids)
result = {"R": R}
for kind in ("auto", "explicit"):
    mesh = make_mesh((2, 4), ("data", "model"), kind)
    p_sh = {k: jax.device_put(v, NamedSharding(mesh, P("model", None) if k == "table" else P()))
            for k, v in params.items()}
    h_sh = jax.device_put(hidden, NamedSharding(mesh, P("data")))
    i_sh = jax.device_put(ids, NamedSharding(mesh, P("data")))
    for path in ("vocab_parallel", "take"):
        lookup = (vocab_parallel_lookup(mesh, "model", batch_axes="data")
                  if path == "vocab_parallel" else None)
        model = base.clone(lookup_fn=lookup)
        try:
            with jax.set_mesh(mesh):
                fn = loss_and_grads(model)
                loss, grads = fn(p_sh, h_sh, i_sh)
                out = jax.jit(lambda p, h, i: model.apply({"params": p}, h, i))(p_sh, h_sh, i_sh)
                hlo = fn.lower(p_sh, h_sh, i_sh).compile().as_text()
        except ValueError as e:
            result[f"{kind}/{path}"] = {"error": str(e)}
            continue
        gathers = [ln.strip() for ln in hlo.splitlines() if "all-gather" in ln]
        result[f"{kind}/{path}"] = {
            "out_err": float(np.abs(np.asarray(out) - np.asarray(ref_out)).max()),
            "loss_rel_err": float(abs(loss - ref_loss) / abs(ref_loss)),
            "grad_err": max(float(np.abs(np.asarray(grads[k]) - np.asarray(ref_grads[k])).max())
                            for k in params),
            "table_shards": sorted({tuple(s.data.shape) for s in p_sh["table"].addressable_shards}),
            "grad_table_shards": sorted({tuple(s.data.shape)
                                         for s in grads["table"].addressable_shards}),
            "table_gathers": [ln[:200] for ln in gathers if re.search(rf"\\[{R},", ln)],
        }
    # Rows over two axes (8 shards, major first), replicated ids; invalid ids read zero rows.
    table = jnp.arange(184 * 3, dtype=jnp.float32).reshape(184, 3)
    flat = jnp.asarray(np.random.default_rng(1).integers(-3, 190, size=(5, 7)), jnp.int32)
    both = vocab_parallel_lookup(mesh, ("data", "model"))
    t2 = jax.device_put(table, NamedSharding(mesh, P(("data", "model"), None)))
    with jax.set_mesh(mesh):
        got = jax.jit(both)(t2, flat)
    valid = (flat >= 0) & (flat < 184)
    want = jnp.where(valid[..., None], table[jnp.clip(flat, 0, 183)], 0.0)
    result[f"{kind}/two_axes_err"] = float(jnp.abs(got - want).max())
print(json.dumps(result))
"""


def test_row_sharded_lookup_on_8_devices():
    res = run_with_devices(8, _SHARDED_CODE)
    assert res["R"] == 184
    for key in ("auto/vocab_parallel", "auto/take", "explicit/vocab_parallel"):
        r = res[key]
        assert r["out_err"] < 1e-5, (key, r)
        assert r["loss_rel_err"] < 1e-5, (key, r)
        assert r["grad_err"] < 1e-4, (key, r)
        assert r["table_shards"] == [[46, 8]], (key, r)
    for key in ("auto/vocab_parallel", "explicit/vocab_parallel"):
        assert res[key]["grad_table_shards"] == [[46, 8]], res[key]  # gradient stays row-sharded
        assert res[key]["table_gathers"] == [], res[key]  # the table is never all-gathered
    assert res["auto/two_axes_err"] == 0.0 and res["explicit/two_axes_err"] == 0.0, res
    # Plain take on an Explicit mesh has no unambiguous gather sharding: a clear error, not a crash.
    assert "vocab_parallel_lookup" in res["explicit/take"]["error"], res["explicit/take"]
