"""Tests for engram_jax.mhc: Sinkhorn, hyper-connection kinds, orientation, init, diagnostics."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from engram_jax import mhc
from engram_jax.layers import rms_norm

B, T, D = 2, 16, 32


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def _reference_sinkhorn(logits: np.ndarray, num_iters: int = 20) -> np.ndarray:
    """Paper §2.3 in float64: exp of max-shifted logits, then T_r(T_c(.)) num_iters times."""
    x = np.asarray(logits, np.float64)
    m = np.exp(x - x.max(axis=(-1, -2), keepdims=True))  # a per-matrix factor cancels
    for _ in range(num_iters):
        m = m / m.sum(axis=-2, keepdims=True)  # columns
        m = m / m.sum(axis=-1, keepdims=True)  # rows
    return m


def _unrolled_log_sinkhorn(logits, num_iters, eps, order):
    """Python-unrolled log-domain Sinkhorn (jax.nn.logsumexp), for plain autodiff."""
    first, second = (-2, -1) if order == "row_last" else (-1, -2)
    log_m = logits
    for _ in range(num_iters):
        for axis in (first, second):
            lse = jax.nn.logsumexp(log_m, axis=axis, keepdims=True)
            if eps > 0:
                lse = jnp.logaddexp(lse, math.log(eps))
            log_m = log_m - lse
    return jnp.exp(log_m)


class _Stack(nn.Module):
    """A small stack: expand -> num_layers x HyperConnection(Dense) -> merge."""

    kind: str
    n: int
    num_layers: int
    sow: bool = False
    coeff_kernel_init: object = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x_BTD):
        x_BTGD = mhc.expand_streams(x_BTD, self.n)
        for i in range(self.num_layers):
            hc = mhc.HyperConnection(
                kind=self.kind,
                n_streams=self.n,
                layer_index=i,
                sow_mixing=self.sow,
                coeff_kernel_init=self.coeff_kernel_init,
                name=f"hc_{i}",
            )
            ffn = nn.Dense(D, kernel_init=nn.initializers.normal(0.3), name=f"ffn_{i}")
            x_BTGD = hc(x_BTGD, ffn)  # a bound submodule of this parent as the sublayer
        return mhc.merge_streams(x_BTGD)


def _perturb(params, sigma, seed=42):
    """Adds sigma * N(0, 1) to every hyper-connection parameter except the pre-norm gains."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys, strict=True):
        name = jax.tree_util.keystr(path)
        skip = "norm" in name or "ffn" in name
        out.append(leaf if skip else leaf + sigma * jax.random.normal(key, leaf.shape))
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture(scope="module")
def x_BTD():
    return jax.random.normal(jax.random.key(0), (B, T, D), jnp.float32)


@functools.cache
def _sinkhorn_value_and_grad(n):
    weights_NN = jnp.arange(n * n, dtype=jnp.float32).reshape(n, n) / (n * n)

    def loss(logits):
        return jnp.sum(mhc.sinkhorn(logits) * weights_NN[None, None])

    return jax.jit(lambda z: (mhc.sinkhorn(z), jax.grad(loss)(z)))


# ---------------------------------------------------------------------------------------------
# Sinkhorn
# ---------------------------------------------------------------------------------------------

SCALES = (0.1, 1.0, 10.0, 100.0)


@pytest.mark.parametrize("n", range(2, 9))
def test_sinkhorn_properties_across_scales(n):
    rng = np.random.default_rng(n)
    z = rng.standard_normal((len(SCALES), 16, n, n)).astype(np.float32)
    logits = z * np.asarray(SCALES, np.float32)[:, None, None, None]  # [S, X, n, n]
    h, g = _sinkhorn_value_and_grad(n)(jnp.asarray(logits))
    h, g = np.asarray(h), np.asarray(g)
    assert h.dtype == np.float32
    assert np.isfinite(h).all() and np.isfinite(g).all()
    assert (h >= 0).all()
    # row_last: rows are the last normalisation, exact to float32 rounding at every scale.
    np.testing.assert_allclose(h.sum(-1), 1.0, atol=1e-5)
    # Columns converge after 20 iterations for moderate logits (scale <= 1, entries 0 and 1 of S).
    np.testing.assert_allclose(h[:2].sum(-2), 1.0, atol=1e-3)
    # float32 log-domain vs float64 exp-domain reference: measured <= 8e-7 at every scale.
    np.testing.assert_allclose(h, _reference_sinkhorn(logits), atol=5e-6, rtol=0)


def test_sinkhorn_columns_last_for_col_last_order():
    logits = 3.0 * jax.random.normal(jax.random.key(1), (64, 4, 4))
    h = np.asarray(mhc.sinkhorn(logits, order="col_last"))
    np.testing.assert_allclose(h.sum(-2), 1.0, atol=1e-5)
    ref = _reference_sinkhorn(np.swapaxes(np.asarray(logits), -1, -2))  # transposed problem
    np.testing.assert_allclose(h, np.swapaxes(ref, -1, -2), atol=5e-6)


def test_sinkhorn_eps_matches_direct_denominator_floor():
    logits = jax.random.normal(jax.random.key(2), (8, 3, 3))
    eps = 1e-2  # large enough to matter
    m = np.exp(np.asarray(logits, np.float64))
    for _ in range(5):
        m = m / (m.sum(-2, keepdims=True) + eps)
        m = m / (m.sum(-1, keepdims=True) + eps)
    h = mhc.sinkhorn(logits, num_iters=5, eps=eps)
    np.testing.assert_allclose(np.asarray(h), m, atol=1e-6)


def test_sinkhorn_bf16_input_computes_in_float32():
    logits32 = 2.0 * jax.random.normal(jax.random.key(3), (32, 4, 4))
    logits16 = logits32.astype(jnp.bfloat16)
    h16 = mhc.sinkhorn(logits16)
    assert h16.dtype == jnp.float32
    # Same as the float32 computation on the bf16-rounded logits (no bf16 arithmetic inside).
    h32 = mhc.sinkhorn(logits16.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(h16), np.asarray(h32))
    np.testing.assert_allclose(np.asarray(h16).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("scale", "eps", "order"),
    [
        (1.0, 0.0, "row_last"),
        (100.0, 0.0, "row_last"),
        (10.0, 1e-6, "col_last"),
        (3.0, 0.1, "row_last"),
    ],
)
def test_sinkhorn_custom_vjp_equals_unrolled_autodiff(scale, eps, order):
    logits = scale * jax.random.normal(jax.random.key(4), (16, 4, 4))
    cot = jax.random.normal(jax.random.key(5), (16, 4, 4))

    @jax.jit
    def grads(z):
        def grad_of(fn):
            return jax.grad(lambda w: jnp.sum(fn(w) * cot))(z)

        return (
            grad_of(lambda w: mhc.sinkhorn(w, 20, eps, order)),
            grad_of(lambda w: mhc.sinkhorn(w, 20, eps, order, recompute_grad=False)),
            grad_of(lambda w: mhc.sinkhorn(w, 5, eps, order)),
            grad_of(lambda w: _unrolled_log_sinkhorn(w, 5, eps, order)),
        )

    g_custom, g_loop, g_custom5, g_unrolled5 = (np.asarray(g) for g in grads(logits))
    assert np.isfinite(g_custom).all()
    assert np.abs(g_custom).max() > 1e-3  # not trivially zero
    # Same maths, different op order: float32 rounding only (gradients are O(1)). 20 iterations
    # against autodiff of the fori_loop; 5 against a Python-unrolled loop (cheaper to compile).
    np.testing.assert_allclose(g_custom, g_loop, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(g_custom5, g_unrolled5, atol=2e-5, rtol=1e-4)


def test_sinkhorn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_iters=0"):
        mhc.sinkhorn(jnp.zeros((4, 4)), num_iters=0)
    with pytest.raises(ValueError, match="order='rows'"):
        mhc.sinkhorn(jnp.zeros((4, 4)), order="rows")
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        mhc.sinkhorn(jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="eps=-1"):
        mhc.sinkhorn(jnp.zeros((4, 4)), eps=-1.0)


# ---------------------------------------------------------------------------------------------
# Streams and module kinds
# ---------------------------------------------------------------------------------------------


def test_expand_and_merge_streams(x_BTD):
    x_BTGD = mhc.expand_streams(x_BTD, 3)
    assert x_BTGD.shape == (B, T, 3, D)
    np.testing.assert_array_equal(np.asarray(x_BTGD[:, :, 2]), np.asarray(x_BTD))
    np.testing.assert_allclose(
        np.asarray(mhc.merge_streams(x_BTGD)), 3 * np.asarray(x_BTD), rtol=1e-6
    )
    np.testing.assert_array_equal(
        np.asarray(mhc.merge_streams(mhc.expand_streams(x_BTD, 1))), np.asarray(x_BTD)
    )


def test_residual_is_bit_exact_prenorm_block(x_BTD):
    ffn = nn.Dense(D, kernel_init=nn.initializers.normal(0.3))
    ffn_params = ffn.init(jax.random.key(1), x_BTD)
    hc = mhc.HyperConnection(kind="residual", n_streams=1)
    x_BTGD = mhc.expand_streams(x_BTD, 1)
    hc_vars = hc.init(jax.random.key(2), x_BTGD, lambda h: h)
    scale = jax.random.normal(jax.random.key(3), (D,)) + 1.0  # non-trivial gain
    hc_vars = {"params": {"norm": {"scale": scale}}}

    def f(h):
        return ffn.apply(ffn_params, h)

    out = jax.jit(lambda v, x: hc.apply(v, x, f))(hc_vars, x_BTGD)
    expected = jax.jit(lambda x: x + f(rms_norm(x, scale, 1e-6)))(x_BTD)
    assert out.shape == (B, T, 1, D)
    np.testing.assert_array_equal(np.asarray(out[:, :, 0]), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(mhc.merge_streams(out)), np.asarray(expected))


@pytest.mark.parametrize("kind", ["hc", "mhc", "mhc_lite"])
def test_single_stream_degenerates_to_gated_residual(kind, x_BTD):
    hc = mhc.HyperConnection(kind=kind, n_streams=1)
    x_BTGD = mhc.expand_streams(x_BTD, 1)
    variables = hc.init(jax.random.key(0), x_BTGD, jnp.tanh)
    variables = {"params": _perturb(meta.unbox(variables["params"]), 0.3)}
    (layer_in, mix) = hc.apply(variables, x_BTGD, method=hc.read)
    # n = 1: mhc (no Sinkhorn) and mhc_lite (one permutation) have H_res = 1 exactly for any
    # parameters; HC's H_res = A_r is an unconstrained scalar gate.
    h_res = np.asarray(mix.h_res)[..., 0, 0]  # [B, T]
    if kind != "hc":
        np.testing.assert_array_equal(h_res, np.ones((B, T), np.float32))
    h_pre, h_post = np.asarray(mix.h_pre)[..., 0], np.asarray(mix.h_post)[..., 0]  # [B, T]
    x = np.asarray(x_BTD)
    scale = np.asarray(variables["params"]["norm"]["scale"])
    gated = h_pre[..., None] * x
    expected_in = gated / np.sqrt(np.mean(gated**2, -1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(layer_in), expected_in, rtol=1e-5, atol=1e-5)
    out = hc.apply(variables, x_BTGD, jnp.tanh)
    expected = h_res[..., None] * x + h_post[..., None] * np.tanh(expected_in)
    np.testing.assert_allclose(np.asarray(out[:, :, 0]), expected, rtol=1e-5, atol=1e-5)
    if kind == "hc":  # at the paper's init (zero dynamic weights) HC with n = 1 is the residual
        hc = hc.clone(coeff_kernel_init=nn.initializers.zeros_init())
        init_vars = hc.init(jax.random.key(0), x_BTGD, jnp.tanh)
        out0 = hc.apply(init_vars, x_BTGD, jnp.tanh)
        ref0 = x_BTD + jnp.tanh(rms_norm(x_BTD, jnp.ones((D,)), 1e-6))
        np.testing.assert_array_equal(np.asarray(out0[:, :, 0]), np.asarray(ref0))


@pytest.mark.parametrize("kind", ["hc", "mhc", "mhc_lite"])
def test_orientation_matches_handwritten_einsum(kind, x_BTD):
    n = 4
    hc = mhc.HyperConnection(kind=kind, n_streams=n)
    x_BTGD = (
        x_BTD[:, :, None, :] * jnp.arange(1.0, n + 1.0)[None, None, :, None]
    )  # distinct streams
    variables = hc.init(jax.random.key(0), x_BTGD, jnp.tanh)
    variables = {"params": _perturb(meta.unbox(variables["params"]), 0.5)}
    layer_in, mix = hc.apply(variables, x_BTGD, method=hc.read)
    h = np.asarray(mix.h_res, np.float64)
    assert (
        np.abs(h - np.swapaxes(h, -1, -2)).max() > 1e-3
    )  # non-symmetric, so a transpose would show
    x = np.asarray(x_BTGD, np.float64)
    y = np.tanh(np.asarray(layer_in, np.float64))
    expected = (
        np.einsum("btij,btjd->btid", h, x) + np.asarray(mix.h_post)[..., None] * y[:, :, None]
    )
    out = hc.apply(variables, x_BTGD, jnp.tanh)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    # read: layer input = norm(sum_i h_pre[i] x[i]).
    pre = np.einsum("btg,btgd->btd", np.asarray(mix.h_pre, np.float64), x)
    scale = np.asarray(variables["params"]["norm"]["scale"])
    expected_in = pre / np.sqrt(np.mean(pre**2, -1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(layer_in), expected_in, rtol=1e-4, atol=1e-5)
    if kind == "mhc":  # the applied matrix is Sinkhorn of the logits, rows = output streams
        np.testing.assert_allclose(h, _reference_sinkhorn(np.asarray(mix.res_logits)), atol=5e-6)
        hc_t = mhc.HyperConnection(kind=kind, n_streams=n, transpose_res=True)
        _, mix_t = hc_t.apply(variables, x_BTGD, method=hc_t.read)
        np.testing.assert_allclose(np.asarray(mix_t.h_res), np.swapaxes(h, -1, -2), atol=1e-7)
    if kind == "hc":  # HC applies A_r^T (§3.1): zero the dynamic part and h_res is static_res^T
        params = dict(variables["params"])
        params["s_alpha"] = jnp.zeros(())
        _, mix0 = hc.apply({"params": params}, x_BTGD, method=hc.read)
        a_r = np.asarray(params["static_res"])
        np.testing.assert_allclose(np.asarray(mix0.h_res[0, 0]), a_r.T, atol=1e-7)


def test_mhc_lite_is_doubly_stochastic(x_BTD):
    for n in (3, 4):
        hc = mhc.HyperConnection(kind="mhc_lite", n_streams=n)
        x_BTGD = x_BTD[:, :, None, :] * jnp.arange(1.0, n + 1.0)[None, None, :, None]
        variables = hc.init(jax.random.key(0), x_BTGD, jnp.tanh)
        variables = {"params": _perturb(meta.unbox(variables["params"]), 3.0)}
        _, mix = hc.apply(variables, x_BTGD, method=hc.read)
        h = np.asarray(mix.h_res)
        assert (h >= 0).all()
        np.testing.assert_allclose(h.sum(-1), 1.0, atol=1e-6)
        np.testing.assert_allclose(h.sum(-2), 1.0, atol=1e-6)
    p = mhc.permutation_matrices(3)
    np.testing.assert_array_equal(p[0], np.eye(3))
    assert len({tuple(m.ravel()) for m in p}) == 6


def test_init_mixing_is_near_identity(x_BTD):
    n = 4
    x_BTGD = x_BTD[:, :, None, :] * jnp.arange(1.0, n + 1.0)[None, None, :, None]
    zeros = nn.initializers.zeros_init()  # the paper's phi = 0: exact values below
    hc = mhc.HyperConnection(kind="mhc", n_streams=n, coeff_kernel_init=zeros)
    variables = hc.init(jax.random.key(0), x_BTGD, jnp.tanh)
    _, mix = hc.apply(variables, x_BTGD, method=hc.read)
    b_res = np.full((n, n), -8.0)
    np.fill_diagonal(b_res, 0.0)
    expected = _reference_sinkhorn(b_res)  # phi = 0: logits are the biases for every token
    assert 0.998 < expected[0, 0] < 0.9995  # diagonal ~0.999 (§2.5)
    np.testing.assert_allclose(
        np.asarray(mix.h_res), np.broadcast_to(expected, (B, T, n, n)), atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(mix.h_pre), 1.0 / n, atol=1e-6)  # sigmoid(-ln(n-1))
    np.testing.assert_allclose(np.asarray(mix.h_post), 1.0, atol=1e-7)  # 2 sigmoid(0)

    # The default phi ~ N(0, 0.02^2) moves every coefficient by < 1e-2 from those values.
    default = mhc.HyperConnection(kind="mhc", n_streams=n)
    _, mix_d = default.apply(
        default.init(jax.random.key(0), x_BTGD, jnp.tanh), x_BTGD, method=default.read
    )
    for field in ("h_res", "h_pre", "h_post"):
        moved = np.abs(np.asarray(getattr(mix_d, field)) - np.asarray(getattr(mix, field))).max()
        assert 0 < moved < 1e-2, field

    lite = mhc.HyperConnection(kind="mhc_lite", n_streams=n, coeff_kernel_init=zeros)
    _, mix_l = lite.apply(lite.init(jax.random.key(0), x_BTGD, jnp.tanh), x_BTGD, method=lite.read)
    w = np.exp(np.r_[0.0, np.full(23, -8.0)])
    w /= w.sum()
    expected_l = np.einsum("k,kij->ij", w, mhc.permutation_matrices(n))
    np.testing.assert_allclose(np.asarray(mix_l.h_res[0, 0]), expected_l, atol=1e-6)

    hyper = mhc.HyperConnection(kind="hc", n_streams=n, layer_index=6, coeff_kernel_init=zeros)
    _, mix_h = hyper.apply(
        hyper.init(jax.random.key(0), x_BTGD, jnp.tanh), x_BTGD, method=hyper.read
    )
    np.testing.assert_array_equal(
        np.asarray(mix_h.h_pre[0, 0]), np.eye(n)[6 % n]
    )  # A_m = e_{k mod n}
    np.testing.assert_array_equal(np.asarray(mix_h.h_res[0, 0]), np.eye(n))
    np.testing.assert_array_equal(np.asarray(mix_h.h_post[0, 0]), np.ones(n))


def test_h_res_parameters_learn_after_one_step(x_BTD):
    # Distinct streams: with the §2.5 default phi = 0 and expanded (identical) streams, nothing
    # breaks the symmetry between streams and H_res has no effect (see HyperConnection's docstring).
    n = 4
    model = _Stack("mhc", n, 2)
    params = meta.unbox(model.init(jax.random.key(0), x_BTD)["params"])
    target = jax.random.normal(jax.random.key(1), (B, T, D))
    x_BTGD = x_BTD[:, :, None, :] * jnp.arange(1.0, n + 1.0)[None, None, :, None]

    ffn = nn.Dense(D)

    def loss(p):
        out = x_BTGD
        for i in range(2):
            hc = mhc.HyperConnection(kind="mhc", n_streams=n, layer_index=i)
            ffn_params = {"params": p[f"ffn_{i}"]}
            out = hc.apply({"params": p[f"hc_{i}"]}, out, lambda h, fp=ffn_params: ffn.apply(fp, h))
        return jnp.mean((mhc.merge_streams(out) - target) ** 2)

    grad_fn = jax.jit(jax.grad(loss))
    g0 = grad_fn(params)
    opt = optax.adam(1e-2)
    updates, _ = opt.update(g0, opt.init(params), params)
    params1 = optax.apply_updates(params, updates)
    g1 = grad_fn(params1)
    for i in range(2):
        assert np.abs(np.asarray(g0[f"hc_{i}"]["phi_res"])).max() > 0
        assert np.abs(np.asarray(g0[f"hc_{i}"]["b_res"])).max() > 0
        # alpha_res multiplies x' phi_res, which is 0 at init: its gradient appears after one step.
        assert np.asarray(g0[f"hc_{i}"]["alpha_res"]) == 0
        assert np.abs(np.asarray(g1[f"hc_{i}"]["alpha_res"])) > 0
        assert (
            np.abs(
                np.asarray(params1[f"hc_{i}"]["b_res"]) - np.asarray(params[f"hc_{i}"]["b_res"])
            ).max()
            > 0
        )


def test_random_coeff_init_breaks_stream_symmetry(x_BTD):
    model = _Stack("mhc", 4, 2, coeff_kernel_init=nn.initializers.normal(0.5))
    params = meta.unbox(model.init(jax.random.key(0), x_BTD)["params"])
    grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x_BTD) ** 3)))(params)
    # Expanded (identical) input streams, yet the second layer's stream mixing gets a gradient.
    assert np.abs(np.asarray(grads["hc_1"]["b_res"])).max() > 1e-7


def test_amax_gain_over_depth_hc_grows_mhc_stays_at_one(x_BTD):
    depth, n, sigma = 16, 4, 0.1
    results = {}
    for kind in ("hc", "mhc"):
        model = _Stack(kind, n, depth, sow=True)
        params = _perturb(meta.unbox(model.init(jax.random.key(0), x_BTD)["params"]), sigma)

        @jax.jit
        def run(p, model=model):
            out, state = model.apply({"params": p}, x_BTD, mutable=["intermediates"])
            inter = state["intermediates"]
            h = jnp.stack([inter[f"hc_{i}"]["h_res"][0].reshape(-1, n, n) for i in range(depth)])
            grads = jax.grad(lambda q: jnp.mean(model.apply({"params": q}, x_BTD) ** 2))(p)
            return mhc.amax_gain(h), grads

        gains, grads = run(params)
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
        results[kind] = {k: np.asarray(v) for k, v in gains.items()}
    hc, ours = results["hc"], results["mhc"]
    # Index 0 = composite over all 16 layers; index 15 = the top layer alone.
    assert hc["composite_forward"][0] > 1.5
    assert hc["composite_forward"][0] > 1.5 * hc["composite_forward"][-1]
    for key in ("composite_forward", "composite_backward", "forward", "backward"):
        assert np.abs(ours[key] - 1.0).max() <= 0.05, (key, ours[key])
    assert ours["composite_min_col_sum"].min() > 0.95


def test_sow_is_optional_and_nn_scan_works_with_read_write(x_BTD):
    n = 4
    x_BTGD = mhc.expand_streams(x_BTD, n)
    quiet = _Stack("mhc", n, 1)
    _, state = quiet.apply(quiet.init(jax.random.key(0), x_BTD), x_BTD, mutable=["intermediates"])
    assert "intermediates" not in state or not state["intermediates"]

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, carry_BTGD, _):
            hc = mhc.HyperConnection(kind="mhc", n_streams=n, sow_mixing=True, name="hc")
            layer_in, mix = hc.read(carry_BTGD)
            return hc.write(carry_BTGD, nn.Dense(D, name="ffn")(layer_in), mix), None

    scanned = nn.scan(
        Layer,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        length=3,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )()
    variables = scanned.init(jax.random.key(0), x_BTGD, None)
    (out, _), state = scanned.apply(variables, x_BTGD, None, mutable=["intermediates"])
    assert out.shape == (B, T, n, D)
    assert variables["params"]["hc"]["b_res"].value.shape == (3, n, n)
    assert state["intermediates"]["hc"]["h_res"][0].shape == (3, B, T, n, n)


# ---------------------------------------------------------------------------------------------
# Float32 stream mixing whatever the compute dtype; one coefficient-init default
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mhc", "mhc_lite", "hc"])
def test_bf16_mixing_is_float32_math(kind, x_BTD):
    # A bf16 site must read and write exactly what the float32 site computes from the same bf16
    # values, rounded once at the end: the coefficients are applied in float32. Eager (unjitted)
    # calls, so both sides run the same float32 ops.
    n = 4
    x_BTGD = x_BTD[:, :, None, :] * jnp.arange(1.0, n + 1.0)[None, None, :, None]
    x_BTGD = x_BTGD.astype(jnp.bfloat16)  # distinct streams, values exactly representable
    x32_BTGD = x_BTGD.astype(jnp.float32)
    y_BTD = jnp.tanh(x_BTD).astype(jnp.bfloat16)
    site16 = mhc.HyperConnection(kind=kind, n_streams=n, dtype=jnp.bfloat16)
    site32 = site16.clone(dtype=jnp.float32)
    variables = site16.init(jax.random.key(0), x_BTGD, jnp.tanh)
    layer_in16, mix16 = site16.apply(variables, x_BTGD, method=site16.read)
    layer_in32, mix32 = site32.apply(variables, x32_BTGD, method=site32.read)
    assert layer_in16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(mix16.h_res), np.asarray(mix32.h_res))
    if kind != "hc":
        # The applied rows sum to 1 (float32); rounded to bf16 they would not: at init the
        # ~0.999 diagonal rounds to 0.998 or 1.0, and every row sum moves by ~1e-3.
        rows = np.asarray(mix16.h_res, np.float64).sum(-1)
        np.testing.assert_allclose(rows, 1.0, atol=1e-6)
        rounded = np.asarray(mix16.h_res.astype(jnp.bfloat16), np.float64).sum(-1)
        assert np.abs(rounded - 1.0).min() > 5e-4
    np.testing.assert_array_equal(layer_in16, layer_in32.astype(jnp.bfloat16))
    out16 = site16.apply(variables, x_BTGD, y_BTD, mix16, method=site16.write)
    out32 = site32.apply(variables, x32_BTGD, y_BTD.astype(jnp.float32), mix32, method=site32.write)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out16, out32.astype(jnp.bfloat16))


def test_coeff_init_default_is_the_trainers(x_BTD):
    from engram_jax.config import HC_COEFF_INIT_STD, base_config

    assert base_config().model.hc.coeff_init_std == HC_COEFF_INIT_STD == 0.02
    n = 4
    site = mhc.HyperConnection(kind="mhc", n_streams=n)
    params = meta.unbox(site.init(jax.random.key(0), mhc.expand_streams(x_BTD, n), jnp.tanh))
    phi = np.concatenate(
        [np.ravel(params["params"][name]) for name in ("phi_pre", "phi_post", "phi_res")]
    )  # 4 * 32 * 24 = 3072 draws: the sample std is within 3% of 0.02
    assert abs(phi.mean()) < 2e-3 and 0.0194 < phi.std() < 0.0206


@pytest.mark.parametrize(
    ("fields", "streams", "match"),
    [
        ({"kind": "dense"}, 4, "kind='dense'"),
        ({"kind": "mhc", "n_streams": 0}, 1, "n_streams=0"),
        ({"kind": "residual", "n_streams": 4}, 4, "kind='residual' with n_streams=4"),
        ({"kind": "mhc", "sinkhorn_iters": 0}, 4, "num_iters=0"),
        ({"kind": "mhc_lite", "n_streams": 7}, 7, "n_streams <= 6"),
        ({"kind": "mhc", "n_streams": 4}, 3, r"expected \[B, T, G, D\] with G=n_streams=4"),
    ],
)
def test_invalid_fields_fail_at_trace_time(fields, streams, match):
    hc = mhc.HyperConnection(**fields)
    x = jnp.zeros((1, 2, streams, 8))
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: hc.init(jax.random.key(0), x, lambda h: h))


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def test_diagnostics_on_hand_made_matrices():
    eye = jnp.broadcast_to(jnp.eye(3), (2, 5, 3, 3))  # [L, X, G, G]
    stats = mhc.mixing_stats(eye, jnp.zeros((2, 5, 3, 3)))
    np.testing.assert_allclose(np.asarray(stats["entropy"]), 0.0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(stats["row_sum_err"]), 0.0)
    np.testing.assert_allclose(np.asarray(stats["min_col_sum"]), 1.0)
    np.testing.assert_allclose(np.asarray(stats["logit_spread"]), 0.0)
    gains = jax.jit(mhc.amax_gain)(eye)
    for value in gains.values():
        np.testing.assert_allclose(np.asarray(value), 1.0)

    uniform = jnp.full((1, 1, 2, 2), 0.5)
    np.testing.assert_allclose(
        np.asarray(mhc.mixing_stats(uniform)["entropy"]), math.log(2), rtol=1e-6
    )

    # Known 2x2 product: layer 0 = A, layer 1 = Bm; the composite from layer 0 is Bm @ A.
    a = np.array([[1.0, 2.0], [0.0, 1.0]])
    bm = np.array([[1.0, 0.0], [-3.0, 1.0]])
    h = jnp.asarray(np.stack([a, bm])[:, None], jnp.float32)  # [L=2, X=1, 2, 2]
    gains = {k: np.asarray(v) for k, v in jax.jit(mhc.amax_gain)(h).items()}
    prod = bm @ a  # [[1, 2], [-3, -5]]: row sums 3, 8; column sums 4, 7
    np.testing.assert_allclose(gains["composite_forward"], [8.0, 4.0])  # bm alone: rows 1, 4
    np.testing.assert_allclose(gains["composite_backward"], [7.0, 4.0])  # bm alone: cols 4, 1
    np.testing.assert_allclose(gains["forward"], [3.0, 4.0])
    np.testing.assert_allclose(gains["backward"], [3.0, 4.0])
    np.testing.assert_allclose(gains["composite_min_col_sum"], [prod.sum(0).min(), -2.0])
    stats = mhc.mixing_stats(h)
    np.testing.assert_allclose(np.asarray(stats["col_sum_err"]), [2.0, 3.0])
    np.testing.assert_allclose(np.asarray(stats["row_sum_err"]), [2.0, 3.0])
