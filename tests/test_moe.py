"""Tests for engram_jax.moe: routing, dispatch, shared experts, bias balancing, balance loss,
MLP."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import moe

B, T, D, E, K, F, S = 2, 16, 32, 8, 2, 16, 2
X = B * T


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _reference_swiglu(x, w_gate, w_up, w_down):
    g = x @ w_gate
    return (g * _sigmoid(g) * (x @ w_up)) @ w_down


def _reference_moe(x_BTD, params, bias, top_k, scale=1.0):
    """Per token: shared(x) + sum over top-k of (s + b) of s_i / sum(s_sel) * scale *
    expert_i(x)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x_BTD, np.float64).reshape(-1, x_BTD.shape[-1])
    scores = _sigmoid(x @ p["router_kernel"])
    out = np.zeros_like(x)
    if "shared" in p:
        sh = p["shared"]
        out += _reference_swiglu(x, sh["w_gate"], sh["w_up"], sh["w_down"])
    selections = []
    for t in range(x.shape[0]):
        sel = np.argsort(-(scores[t] + np.asarray(bias, np.float64)), kind="stable")[:top_k]
        selections.append(sorted(sel.tolist()))
        gates = scores[t, sel] / scores[t, sel].sum() * scale
        for g, e in zip(gates, sel, strict=True):
            out[t] += g * _reference_swiglu(x[t], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
    return out.reshape(x_BTD.shape), selections


def _reference_balance_loss(x_BTD, router_kernel, bias, top_k, alpha):
    x = np.asarray(x_BTD, np.float64)
    scores = _sigmoid(x @ np.asarray(router_kernel, np.float64))  # [B, T, E]
    b, t, e = scores.shape
    total = 0.0
    for i in range(b):
        counts = np.zeros(e)
        for j in range(t):
            counts[np.argsort(-(scores[i, j] + bias), kind="stable")[:top_k]] += 1
        f = e / (top_k * t) * counts
        p = (scores[i] / scores[i].sum(-1, keepdims=True)).mean(0)
        total += np.sum(f * p)
    return alpha * total / b


@pytest.fixture(scope="module")
def x_BTD():
    return jax.random.normal(jax.random.PRNGKey(1), (B, T, D), jnp.float32)


@pytest.fixture(scope="module")
def variables(x_BTD):
    module = moe.MoE(num_experts=E, top_k=K, expert_hidden_size=F, num_shared_experts=S)
    return nn.meta.unbox(module.init(jax.random.PRNGKey(0), x_BTD))


@pytest.fixture(scope="module")
def skew_bias():
    # Large enough to change some selections (checked in the test), small enough not to change all.
    return jnp.asarray(np.random.default_rng(3).normal(0.0, 0.15, E), jnp.float32)


def test_param_shapes(variables):
    shapes = jax.tree.map(jnp.shape, variables)
    assert shapes == {
        "params": {
            "router_kernel": (D, E),
            "w_gate": (E, D, F),
            "w_up": (E, D, F),
            "w_down": (E, F, D),
            "shared": {"w_gate": (D, S * F), "w_up": (D, S * F), "w_down": (S * F, D)},
        },
        "moe_bias": {"bias": (E,)},
    }
    np.testing.assert_array_equal(variables["moe_bias"]["bias"], np.zeros(E))


def test_mlp_matches_numpy(x_BTD):
    mlp = moe.MLP(hidden_size=F)
    params = nn.meta.unbox(mlp.init(jax.random.PRNGKey(2), x_BTD))["params"]
    assert jax.tree.map(jnp.shape, params) == {"w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
    y = mlp.apply({"params": params}, x_BTD)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    expected = _reference_swiglu(np.asarray(x_BTD, np.float64), p["w_gate"], p["w_up"], p["w_down"])
    # f32 matmuls of width <= 32 against float64: 1e-5 is ample.
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["ragged", "capacity"])
def test_moe_matches_numpy_reference_with_bias(dispatch, x_BTD, variables, skew_bias):
    # capacity_factor = E / K makes C = X: nothing can be dropped, so both dispatches are exact.
    module = moe.MoE(
        num_experts=E,
        top_k=K,
        expert_hidden_size=F,
        num_shared_experts=S,
        routed_scaling_factor=2.5,
        dispatch=dispatch,
        capacity_factor=E / K,
    )
    y, stats = module.apply({"params": variables["params"], "moe_bias": {"bias": skew_bias}}, x_BTD)
    expected, selections = _reference_moe(x_BTD, variables["params"], skew_bias, K, scale=2.5)
    _, unbiased = _reference_moe(x_BTD, variables["params"], np.zeros(E), K)
    assert selections != unbiased, "the bias must change some selections for this test to bite"
    # f32 against float64 over sums of ~10 terms of O(1): 2e-5.
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)
    assert float(stats["dropped_fraction"]) == 0.0
    counts = np.bincount(np.asarray(selections).ravel(), minlength=E)
    np.testing.assert_array_equal(stats["tokens_per_expert"], counts)
    np.testing.assert_allclose(float(jnp.sum(stats["load"])), 1.0, rtol=1e-6)
    np.testing.assert_allclose(stats["max_violation"], counts.max() / (X * K) * E - 1.0, rtol=1e-6)


def _contributions(dispatch, x_XD, experts_XK, gates_XK, params, capacity):
    """Change of each token's output when expert e is silenced: nonzero iff e served the token."""

    @jax.jit
    def out(w_down_EFD):
        args = (x_XD, experts_XK, gates_XK, params["w_gate"], params["w_up"], w_down_EFD)
        if dispatch == "ragged":
            return moe.expert_ffn_ragged(*args)
        return moe.expert_ffn_capacity(*args, capacity)[0]

    full_XD = out(params["w_down"])
    # jacfwd would need vmap of ragged_dot over a non-leading axis, which jax 0.10 lacks: loop.
    changes = [
        np.abs(full_XD - out(params["w_down"].at[e].set(0.0))).max(axis=-1) for e in range(E)
    ]
    return np.stack(changes, axis=1)  # [X, E]


@pytest.mark.parametrize(
    ("dispatch", "capacity"), [("ragged", 0), ("capacity", X), ("capacity", 3)]
)
def test_each_token_reaches_exactly_its_top_k(dispatch, capacity, x_BTD, variables):
    params = variables["params"]
    x_XD = x_BTD.reshape(X, D)
    _, gates_XK, experts_XK = moe.route(x_XD @ params["router_kernel"], jnp.zeros((E,)), K)
    used_XE = _contributions(dispatch, x_XD, experts_XK, gates_XK, params, capacity) != 0
    chosen_XE = np.zeros((X, E), bool)
    np.put_along_axis(chosen_XE, np.asarray(experts_XK), True, axis=1)
    if capacity in (0, X):
        np.testing.assert_array_equal(used_XE.sum(1), np.full(X, K))
        np.testing.assert_array_equal(used_XE, chosen_XE)
        return
    # Small capacity: kept slots are the first C per expert in k-major, then token, order.
    kept_XE = np.zeros((X, E), bool)
    filled = np.zeros(E, int)
    for k in range(K):
        for t in range(X):
            e = int(experts_XK[t, k])
            if filled[e] < capacity:
                kept_XE[t, e] = True
                filled[e] += 1
    assert kept_XE.sum() < X * K, "capacity 3 must drop slots for this test to bite"
    np.testing.assert_array_equal(used_XE, kept_XE)
    _, dropped = moe.expert_ffn_capacity(
        x_XD, experts_XK, gates_XK, params["w_gate"], params["w_up"], params["w_down"], capacity
    )
    np.testing.assert_allclose(float(dropped), 1.0 - kept_XE.sum() / (X * K), rtol=1e-6)


def test_shared_experts_always_contribute(x_BTD, variables):
    module = moe.MoE(num_experts=E, top_k=K, expert_hidden_size=F, num_shared_experts=S)
    params = dict(variables["params"], w_down=jnp.zeros((E, F, D)))  # routed experts output 0
    y, _ = module.apply({"params": params, "moe_bias": variables["moe_bias"]}, x_BTD)
    sh = jax.tree.map(lambda a: np.asarray(a, np.float64), params["shared"])
    expected = _reference_swiglu(
        np.asarray(x_BTD, np.float64), sh["w_gate"], sh["w_up"], sh["w_down"]
    )
    assert np.abs(expected).min(axis=-1).max() > 0
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_update_router_bias_direction():
    bias = jnp.array([0.0, 0.5, -0.5, 0.0], jnp.float32)
    load = jnp.array([0.4, 0.1, 0.25, 0.25], jnp.float32)  # mean 0.25
    new = moe.update_router_bias(bias, load, rate=0.1)
    np.testing.assert_allclose(new, [-0.1, 0.6, -0.5, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match="update_router_bias"):
        moe.update_router_bias(bias, load[:3], rate=0.1)


def test_bias_update_balances_skewed_router():
    b, t = 4, 128
    module = moe.MoE(num_experts=E, top_k=K, expert_hidden_size=F, num_shared_experts=0)
    params = nn.meta.unbox(module.init(jax.random.PRNGKey(0), jnp.zeros((b, t, D))))["params"]
    # Input feature 0 is constant 1, so these kernel entries are fixed logit offsets +3 and +2:
    # experts 0 and 1 start with affinity ~0.95 and ~0.88 against ~0.5 for the rest.
    params = dict(params, router_kernel=params["router_kernel"].at[0, 0].set(3.0).at[0, 1].set(2.0))

    @jax.jit
    def load_fn(bias_E, step):
        # A fresh batch each step, as in training.
        x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(5), step), (b, t, D))
        x = x.at[..., 0].set(1.0)
        _, stats = module.apply({"params": params, "moe_bias": {"bias": bias_E}}, x)
        return stats["load"], stats["max_violation"]

    bias = jnp.zeros((E,))
    violations = []
    for step in range(100):
        load, violation = load_fn(bias, step)
        violations.append(float(violation))
        bias = moe.update_router_bias(bias, load, rate=0.01)
    assert violations[0] > 2.0, "the toy router must start badly imbalanced"
    # Sign updates jitter around balance and each batch is a fresh sample: judge the mean of the
    # last
    # 20 steps (about 0.16 here) against the start (2.7).
    assert np.mean(violations[-20:]) < 0.15 * violations[0]
    assert float(bias[0]) < 0 and float(bias[1]) < 0


def test_gradients_and_balance_loss(x_BTD, variables, skew_bias):
    alpha = 0.01
    module = moe.MoE(
        num_experts=E, top_k=K, expert_hidden_size=F, num_shared_experts=S, seq_balance_weight=alpha
    )
    bias_vars = {"bias": skew_bias}

    def loss(params, which):
        y, stats = module.apply({"params": params, "moe_bias": bias_vars}, x_BTD)
        return jnp.sum(y**2) if which == "output" else stats["balance_loss"]

    grads = jax.grad(loss)(variables["params"], "output")
    assert set(grads) == {"router_kernel", "w_gate", "w_up", "w_down", "shared"}  # no bias
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0, f"no gradient reached {jax.tree_util.keystr(path)}"
    # Exactly the experts that served some token get gradient in their slice.
    _, stats = module.apply({"params": variables["params"], "moe_bias": bias_vars}, x_BTD)
    served_E = np.asarray(stats["tokens_per_expert"]) > 0
    assert served_E.sum() >= 2
    np.testing.assert_array_equal(np.abs(grads["w_down"]).sum(axis=(1, 2)) > 0, served_E)

    expected = _reference_balance_loss(
        x_BTD, variables["params"]["router_kernel"], np.asarray(skew_bias, np.float64), K, alpha
    )
    np.testing.assert_allclose(float(stats["balance_loss"]), expected, rtol=1e-5)
    balance_grads = jax.grad(loss)(variables["params"], "balance")
    assert float(jnp.abs(balance_grads["router_kernel"]).max()) > 0
    assert float(jnp.abs(balance_grads["w_gate"]).max()) == 0  # the loss only sees the router


def test_balance_loss_disabled(x_BTD, variables):
    module = moe.MoE(
        num_experts=E, top_k=K, expert_hidden_size=F, num_shared_experts=S, seq_balance_weight=0.0
    )
    _, stats = module.apply(variables, x_BTD)
    assert float(stats["balance_loss"]) == 0.0


def test_bf16_close_to_f32(x_BTD, variables):
    def run(dtype):
        module = moe.MoE(
            num_experts=E, top_k=K, expert_hidden_size=F, num_shared_experts=S, dtype=dtype
        )
        return module.apply(variables, x_BTD)

    y32, stats32 = run(jnp.float32)
    y16, stats16 = run(jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    # Routing runs in f32 from the same input, so the selections agree exactly.
    np.testing.assert_array_equal(stats16["tokens_per_expert"], stats32["tokens_per_expert"])
    # bf16 keeps 8 mantissa bits (~0.4% per rounding); three matmuls and a product: 3% of the scale.
    err = float(jnp.abs(y16.astype(jnp.float32) - y32).max())
    assert err <= 0.03 * float(jnp.abs(y32).max())


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"top_k": E + 1}, "MoE.top_k"),
        ({"top_k": 0}, "MoE.top_k"),
        ({"num_experts": 0, "top_k": 1}, "MoE.num_experts"),
        ({"expert_hidden_size": 0}, "MoE.expert_hidden_size"),
        ({"dispatch": "dense"}, "MoE.dispatch"),
        ({"capacity_factor": 0.0}, "MoE.capacity_factor"),
        ({"num_shared_experts": -1}, "MoE.num_shared_experts"),
    ],
)
def test_bad_config_errors(fields, match, x_BTD):
    config = {"num_experts": E, "top_k": K, "expert_hidden_size": F} | fields
    with pytest.raises(ValueError, match=match):
        moe.MoE(**config).init(jax.random.PRNGKey(0), x_BTD)


def test_nnx_bridge(x_BTD):
    from flax import nnx

    module = moe.MoE(num_experts=E, top_k=K, expert_hidden_size=F, num_shared_experts=S)
    # Eager sharding needs a mesh for logically partitioned variables; none here.
    with nnx.use_eager_sharding(False):
        model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0)).lazy_init(x_BTD)
    y, stats = model(x_BTD)
    assert y.shape == (B, T, D)
    np.testing.assert_allclose(float(jnp.sum(stats["load"])), 1.0, rtol=1e-6)


def test_bias_updates_inside_apply_only_when_mutable():
    layer = moe.MoE(num_experts=8, top_k=2, expert_hidden_size=16, bias_update_rate=0.01)
    x_BTD = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 32))
    variables = layer.init(jax.random.PRNGKey(4), x_BTD)
    np.testing.assert_array_equal(np.asarray(nn.meta.unbox(variables["moe_bias"])["bias"]), 0.0)
    (_, stats), updated = layer.apply(variables, x_BTD, mutable=["moe_bias"])
    expected = moe.update_router_bias(jnp.zeros(8), stats["load"], 0.01)
    np.testing.assert_allclose(nn.meta.unbox(updated["moe_bias"])["bias"], expected)
    assert np.any(np.asarray(expected) != 0.0)
    # Read-only (evaluation): the bias is left alone and nothing is returned for it.
    _, stats_eval = layer.apply(variables, x_BTD)
    np.testing.assert_allclose(stats_eval["load"], stats["load"])
