"""Tests for engram_jax.moe: routing, dispatch, shared experts, bias balancing, balance loss,
padding masks, MLP; and, in the model, the default dispatch against cached decoding."""

import pathlib
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import moe
from engram_jax.config import load_config_file, validate
from engram_jax.hashing import NgramHasher
from engram_jax.model import MOE_BIAS, Transformer, cross_entropy_loss

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


@pytest.mark.parametrize("dispatch", ["default", "ragged", "capacity"])
def test_moe_matches_numpy_reference_with_bias(dispatch, x_BTD, variables, skew_bias):
    # The default (dropless) as a user gets it; capacity_factor = E / K makes C = X for
    # "capacity", where nothing can be dropped, so every dispatch is exact.
    chosen = {} if dispatch == "default" else {"dispatch": dispatch, "capacity_factor": E / K}
    module = moe.MoE(
        num_experts=E,
        top_k=K,
        expert_hidden_size=F,
        num_shared_experts=S,
        routed_scaling_factor=2.5,
        **chosen,
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
        if dispatch == "dropless":
            return moe.expert_ffn_dropless(*args)
        return moe.expert_ffn_capacity(*args, capacity)[0]

    full_XD = out(params["w_down"])
    # jacfwd would need vmap of ragged_dot over a non-leading axis, which jax 0.10 lacks: loop.
    changes = [
        np.abs(full_XD - out(params["w_down"].at[e].set(0.0))).max(axis=-1) for e in range(E)
    ]
    return np.stack(changes, axis=1)  # [X, E]


@pytest.mark.parametrize(
    ("dispatch", "capacity"),
    [("dropless", 0), ("ragged", 0), ("capacity", X), ("capacity", 3)],
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
        ({"block_size": 0}, "MoE.block_size"),
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


# ------------------------------------------------------------------------------------------------
# The default dispatch is dropless and causal.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def skewed(x_BTD, variables):
    """Default and capacity MoE under a skewed router, jitted once each."""
    # Feature 0 is constant 1, so these kernel entries are fixed logit offsets: experts 0 and 1
    # are preferred by most tokens, as an early or unbalanced router does.
    x_BTD = x_BTD.at[..., 0].set(1.0)
    params = variables["params"]
    params = dict(params, router_kernel=params["router_kernel"].at[0, 0].set(2.0).at[0, 1].set(1.5))
    skewed_variables = {"params": params, "moe_bias": variables["moe_bias"]}
    default = moe.MoE(num_experts=E, top_k=K, expert_hidden_size=F, num_shared_experts=S)
    capacity = default.clone(dispatch="capacity")  # capacity_factor 1.25, the old default
    return (
        x_BTD,
        jax.jit(lambda x: default.apply(skewed_variables, x)),
        jax.jit(lambda x: capacity.apply(skewed_variables, x)),
    )


def test_default_dispatch_is_causal_under_skewed_router(skewed):
    x_BTD, run_default, run_capacity = skewed
    assert moe.MoE.dispatch == "dropless"
    y_default, stats = run_default(x_BTD)
    y_capacity, capacity_stats = run_capacity(x_BTD)
    assert float(stats["dropped_fraction"]) == 0.0
    assert float(capacity_stats["dropped_fraction"]) > 0.2, "the skew must overflow capacities"
    rng = np.random.default_rng(0)
    capacity_changed = 0
    for _ in range(10):
        last = rng.normal(size=D).astype(np.float32)
        last[0] = 1.0
        x_new = x_BTD.at[B - 1, T - 1].set(last)  # the last token of the flattened batch only
        y_new, _ = run_default(x_new)
        # Bit-identical: every earlier token of that row and every token of the other row.
        np.testing.assert_array_equal(y_new[:, :-1], y_default[:, :-1])
        np.testing.assert_array_equal(y_new[0], y_default[0])
        assert np.any(y_new[B - 1, T - 1] != y_default[B - 1, T - 1])
        y_capacity_new, _ = run_capacity(x_new)
        capacity_changed += not np.array_equal(y_capacity_new[:, :-1], y_capacity[:, :-1])
    # The test can fail: under capacity dispatch the last token moves earlier tokens' outputs.
    assert capacity_changed > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropless_rows_do_not_depend_on_their_place_in_sorted_order(dtype):
    # 512 tokens x 2 choices over 8 experts fill the default 128-row blocks. Permuting the tokens
    # puts each slot in another row (and often another block) of its expert's group, so this
    # checks that the block matmuls give a row the same bits wherever it sits.
    x, d, f = 512, 64, 96
    keys = jax.random.split(jax.random.PRNGKey(7), 5)
    x_XD = jax.random.normal(keys[0], (x, d), jnp.float32)
    router_DE = jax.random.normal(keys[1], (d, E), jnp.float32) * 0.3
    w_gate, w_up = (jax.random.normal(k, (E, d, f), jnp.float32) / 8 for k in keys[2:4])
    w_down = jax.random.normal(keys[4], (E, f, d), jnp.float32) / 10
    _, gates_XK, experts_XK = moe.route(x_XD @ router_DE, jnp.zeros((E,)), K)
    assert moe.dropless_block_size(x * K, E) == moe.DEFAULT_BLOCK_SIZE == 128
    ffn = jax.jit(moe.expert_ffn_dropless)
    weights = [w.astype(dtype) for w in (w_gate, w_up, w_down)]
    y_XD = np.asarray(ffn(x_XD.astype(dtype), experts_XK, gates_XK, *weights).astype(jnp.float32))
    perm = np.random.default_rng(1).permutation(x)
    y_perm = ffn(x_XD[perm].astype(dtype), experts_XK[perm], gates_XK[perm], *weights)
    np.testing.assert_array_equal(np.asarray(y_perm.astype(jnp.float32)), y_XD[perm])
    if dtype == jnp.float32:
        p = [np.asarray(w, np.float64) for w in (w_gate, w_up, w_down)]
        x64 = np.asarray(x_XD, np.float64)
        every_EXD = np.stack([_reference_swiglu(x64, *(w[e] for w in p)) for e in range(E)])
        chosen_XKD = every_EXD[np.asarray(experts_XK), np.arange(x)[:, None]]  # [X, K, D]
        expected = np.einsum("xk,xkd->xd", np.asarray(gates_XK, np.float64), chosen_XKD)
        np.testing.assert_allclose(y_XD, expected, rtol=2e-5, atol=2e-5)


def test_dropless_block_size_and_padding_bound():
    assert moe.dropless_block_size(16384, 16) == 128
    assert moe.dropless_block_size(16384, 16, block_size=512) == 512
    assert moe.dropless_block_size(64, 4) == 16  # 16 slots per expert
    assert moe.dropless_block_size(40, 8) == 4  # 5 per expert -> largest power of two <= 5
    assert moe.dropless_block_size(2, 8) == 1  # decoding one token
    # Every split of S slots over E experts fits the static block count, the worst case included.
    for experts_S in (np.zeros(40, np.int32), np.arange(40, dtype=np.int32) % 8):
        row_S, block_expert_Nb, num_blocks = moe._dropless_layout(jnp.asarray(experts_S), 8, 4)
        row_S = np.asarray(row_S)
        assert len(set(row_S.tolist())) == 40 and row_S.max() < num_blocks * 4
        np.testing.assert_array_equal(np.asarray(block_expert_Nb)[row_S // 4], experts_S)


# ------------------------------------------------------------------------------------------------
# Padding: the mask keeps padded positions out of the routing statistics.
# ------------------------------------------------------------------------------------------------


def _padding_mask():
    mask_BT = np.ones((B, T), np.float32)
    mask_BT[0, 10:] = 0.0  # row 0 ends in padding, which precedes row 1 in the flattened batch
    return mask_BT


def test_mask_keeps_padding_out_of_load_balance_loss_and_bias_update(x_BTD, variables, skew_bias):
    alpha, rate = 0.01, 0.01
    module = moe.MoE(
        num_experts=E,
        top_k=K,
        expert_hidden_size=F,
        num_shared_experts=S,
        seq_balance_weight=alpha,
        bias_update_rate=rate,
    )
    mask_BT = _padding_mask()
    model_variables = {"params": variables["params"], "moe_bias": {"bias": skew_bias}}

    @jax.jit
    def run(x, mask):
        return module.apply(model_variables, x, mask, mutable=["moe_bias"])

    (y, stats), updated = run(x_BTD, mask_BT)
    _, selections = _reference_moe(x_BTD, variables["params"], skew_bias, K)
    valid = mask_BT.reshape(-1) > 0
    counts = np.bincount(np.asarray(selections)[valid].ravel(), minlength=E)
    np.testing.assert_array_equal(stats["tokens_per_expert"], counts)
    np.testing.assert_allclose(stats["load"], counts / (valid.sum() * K), rtol=1e-6)
    expected_bias = moe.update_router_bias(skew_bias, jnp.asarray(counts, jnp.float32), rate)
    np.testing.assert_array_equal(updated["moe_bias"]["bias"], expected_bias)
    # Balance loss: each row's f and P over its own unmasked tokens (T = 10 for row 0).
    skew64 = np.asarray(skew_bias, np.float64)
    kernel = variables["params"]["router_kernel"]
    per_row = [
        _reference_balance_loss(x_BTD[i : i + 1, : int(mask_BT[i].sum())], kernel, skew64, K, 1.0)
        for i in range(B)
    ]
    np.testing.assert_allclose(float(stats["balance_loss"]), alpha * np.mean(per_row), rtol=1e-5)

    # Padded positions may hold anything: the statistics, the update and the real tokens'
    # outputs are bit-identical.
    noise = jax.random.normal(jax.random.PRNGKey(9), x_BTD.shape) * 3.0
    x_other = jnp.where(jnp.asarray(mask_BT)[..., None] > 0, x_BTD, noise)
    (y_other, stats_other), updated_other = run(x_other, mask_BT)
    for key in ("load", "tokens_per_expert", "balance_loss", "max_violation"):
        np.testing.assert_array_equal(stats_other[key], stats[key])
    np.testing.assert_array_equal(updated_other["moe_bias"]["bias"], updated["moe_bias"]["bias"])
    np.testing.assert_array_equal(y_other[mask_BT > 0], y[mask_BT > 0])
    # Without the mask the padding counts: the test can fail.
    (_, unmasked), _ = run(x_other, np.ones((B, T), np.float32))
    assert not np.array_equal(unmasked["tokens_per_expert"], stats["tokens_per_expert"])

    # All padding: no load, no bias step, no balance loss.
    (_, empty), updated_empty = run(x_BTD, np.zeros((B, T), np.float32))
    np.testing.assert_array_equal(empty["load"], np.zeros(E))
    assert float(empty["balance_loss"]) == 0.0
    np.testing.assert_array_equal(updated_empty["moe_bias"]["bias"], skew_bias)


def test_capacity_padding_takes_no_slot(x_BTD, variables):
    params = variables["params"]
    x_XD = x_BTD.reshape(X, D)
    _, gates_XK, experts_XK = moe.route(x_XD @ params["router_kernel"], jnp.zeros((E,)), K)
    weights = (params["w_gate"], params["w_up"], params["w_down"])
    valid_X = _padding_mask().reshape(-1) > 0
    ffn = jax.jit(moe.expert_ffn_capacity, static_argnums=6)
    capacity = 4
    y_XD, dropped = ffn(x_XD, experts_XK, gates_XK, *weights, capacity, jnp.asarray(valid_X))
    # Same as a call on the real tokens alone (in the same order), with the same capacity.
    y_real, dropped_real = ffn(
        x_XD[valid_X], experts_XK[valid_X], gates_XK[valid_X], *weights, capacity
    )
    np.testing.assert_allclose(y_XD[valid_X], y_real, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y_XD[~valid_X], 0.0)
    np.testing.assert_allclose(float(dropped), float(dropped_real), rtol=1e-6)
    # Without the mask, row 0's padding takes slots from row 1: the test can fail.
    y_unmasked, _ = ffn(x_XD, experts_XK, gates_XK, *weights, capacity)
    assert not np.allclose(y_unmasked[valid_X], y_real, rtol=1e-6, atol=1e-6)


def test_mask_shape_is_checked(x_BTD, variables):
    module = moe.MoE(num_experts=E, top_k=K, expert_hidden_size=F, num_shared_experts=S)
    with pytest.raises(ValueError, match=r"MoE: mask has shape \(2, 15\); expected \[B, T\]"):
        module.apply(variables, x_BTD, jnp.ones((B, T - 1)))


# ------------------------------------------------------------------------------------------------
# In the model: configs/tiny.py as shipped (default dispatch), full forward vs cached decoding.
# ------------------------------------------------------------------------------------------------

TINY_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
TINY_B, TINY_T = 2, 12


@pytest.fixture(scope="module")
def tiny():
    """The tiny model with a skewed MoE bias: tokens, hash ids, variables, a fresh decode cache
    and the training-mode forward (MoE bias mutable, token mask an argument), jitted once."""
    cfg = validate(load_config_file(TINY_CONFIG)).model
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (TINY_B, TINY_T)).astype(np.int32)
    segments = np.ones_like(tokens)
    positions = np.broadcast_to(np.arange(TINY_T, dtype=np.int32), tokens.shape)
    e = cfg.engram
    hasher = NgramHasher(
        e.table_rows_per_head,
        e.max_ngram,
        e.heads_per_ngram,
        e.layer_ids,
        token_vocab_size=cfg.vocab_size,
        pad_id=0,  # the config's pad_id=-1 means "the tokenizer's"; there is no tokenizer here
        seed=e.hash_seed,
    )
    by_layer = hasher.hash_all(tokens, segments)
    hash_ids = np.stack([by_layer[layer] for layer in e.layer_ids], axis=1)  # [B, L_e, T, M]
    decoder = Transformer(cfg, decode=True)
    # An XLA RngBitGenerator key: the initialiser compiles in a third of threefry's time.
    key = jax.random.key(0, impl="unsafe_rbg")
    variables = nn.meta.unbox(jax.jit(decoder.init)(key, tokens, None, None, hash_ids))
    cache = variables.pop("cache")
    # Every MoE layer's balancing bias favours experts 0 and 1, as an unbalanced router would.
    variables[MOE_BIAS] = jax.tree.map(
        lambda b: b.at[..., 0].add(0.5).at[..., 1].add(0.4), variables[MOE_BIAS]
    )
    model = Transformer(cfg)

    @jax.jit
    def forward(tokens_BT, mask_BT):
        return model.apply(
            variables,
            tokens_BT,
            positions,
            segments,
            hash_ids,
            token_mask_BT=mask_BT,
            mutable=[MOE_BIAS],
        )

    return types.SimpleNamespace(
        cfg=cfg,
        tokens=tokens,
        positions=positions,
        hash_ids=hash_ids,
        variables=variables,
        cache=cache,
        decoder=decoder,
        forward=forward,
    )


def test_tiny_full_forward_loss_equals_cached_decoding(tiny):
    cfg = tiny.cfg
    assert cfg.moe.num_experts > 0 and cfg.moe.dispatch == "dropless"  # the shipped default
    (logits, aux), _ = tiny.forward(tiny.tokens, np.ones(tiny.tokens.shape, np.float32))
    # Some expert draws more slots than capacity_factor * X * K / E: capacity dispatch would drop.
    assert float(np.max(aux["moe_load"])) * cfg.moe.num_experts > cfg.moe.capacity_factor
    targets = tiny.tokens[:, 1:]
    loss, count = cross_entropy_loss(logits[:, :-1], targets, np.ones(targets.shape))
    full_log_probs = np.take_along_axis(
        np.asarray(jax.nn.log_softmax(logits[:, :-1])), targets[..., None], axis=-1
    )[..., 0]

    @jax.jit
    def step(cache, tokens_B1, positions_B1, hash_ids):
        (step_logits, _), updates = tiny.decoder.apply(
            {**tiny.variables, "cache": cache},
            tokens_B1,
            positions_B1,
            None,
            hash_ids,
            mutable=["cache"],
        )
        return jax.nn.log_softmax(step_logits[:, 0]), updates["cache"]

    cache, decoded = tiny.cache, []
    for t in range(TINY_T - 1):
        log_probs_BV, cache = step(
            cache,
            tiny.tokens[:, t : t + 1],
            tiny.positions[:, t : t + 1],
            tiny.hash_ids[:, :, t : t + 1],
        )
        decoded.append(np.take_along_axis(np.asarray(log_probs_BV), targets[:, t : t + 1], 1))
    decoded_BT = np.concatenate(decoded, axis=1)
    # float32; one-token and whole-sequence matmuls round differently (measured: 1.5e-5 on a
    # sum of 195.6; capacity dispatch at its default 1.25 misses by 0.4).
    np.testing.assert_allclose(decoded_BT, full_log_probs, rtol=0, atol=1e-4)
    np.testing.assert_allclose(-decoded_BT.sum(), float(loss * count), rtol=1e-6)


def test_tiny_padding_stays_out_of_moe_statistics(tiny):
    mask = np.ones(tiny.tokens.shape, np.float32)
    mask[1, 8:] = 0.0
    other = tiny.tokens.copy()
    other[1, 8:] = (other[1, 8:] + 17) % tiny.cfg.vocab_size  # new content in the padding only
    (logits, aux), updated = tiny.forward(tiny.tokens, mask)
    (logits_other, aux_other), updated_other = tiny.forward(other, mask)
    for key in ("moe_load", "moe_balance_loss"):
        np.testing.assert_array_equal(aux_other[key], aux[key])
    jax.tree.map(np.testing.assert_array_equal, updated_other, updated)
    np.testing.assert_array_equal(logits_other[mask > 0], logits[mask > 0])
    # Without the mask the padding's routing counts: the test can fail.
    (_, aux_unmasked), _ = tiny.forward(other, np.ones_like(mask))
    assert not np.array_equal(aux_unmasked["moe_load"], aux["moe_load"])
