"""Tests for engram_jax.optim: schedules, dense AdamW, table optimizer, dense/memory split."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import optim


def _reference_adam_first_step(g, lr, b1, b2, eps):
    """Adam's first step (t=1) in numpy: -lr * m_hat / (sqrt(v_hat) + eps), bias-corrected."""
    m = (1 - b1) * g
    v = (1 - b2) * g * g
    m_hat = m / (1 - b1)
    v_hat = v / (1 - b2)
    return -lr * m_hat / (np.sqrt(v_hat) + eps)


# --------------------------------------------------------------------------------------- schedules


def test_cosine_schedule_values():
    peak, warmup, total, final = 1e-3, 10, 110, 0.1
    sched = optim.learning_rate_schedule(peak, warmup, total, "cosine", final_fraction=final)
    # Warmup is linear from 0.
    for s in (0, 3, 7):
        np.testing.assert_allclose(float(sched(s)), peak * s / warmup, rtol=1e-6)
    np.testing.assert_allclose(float(sched(warmup)), peak, rtol=1e-6)
    # Cosine half-way: peak * (final + (1 - final) * 0.5 * (1 + cos(pi/2))).
    mid = warmup + (total - warmup) // 2
    np.testing.assert_allclose(float(sched(mid)), peak * (final + (1 - final) * 0.5), rtol=1e-5)
    np.testing.assert_allclose(float(sched(total)), peak * final, rtol=1e-5)
    np.testing.assert_allclose(float(sched(total + 50)), peak * final, rtol=1e-5)


def test_wsd_schedule_values():
    peak, warmup, total = 2e-3, 10, 100
    sched = optim.learning_rate_schedule(
        peak, warmup, total, "wsd", final_fraction=0.0, decay_fraction=0.2
    )
    np.testing.assert_allclose(float(sched(5)), peak * 0.5, rtol=1e-6)
    # Stable until step total - 0.2*total = 80, then linear to 0 at 100.
    for s in (10, 40, 80):
        np.testing.assert_allclose(float(sched(s)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(sched(90)), peak * 0.5, rtol=1e-5)
    np.testing.assert_allclose(float(sched(100)), 0.0, atol=1e-12)


def test_constant_schedule_and_no_warmup():
    sched = optim.learning_rate_schedule(3e-4, 4, 50, "constant")
    np.testing.assert_allclose(float(sched(2)), 1.5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(sched(4)), 3e-4, rtol=1e-6)
    np.testing.assert_allclose(float(sched(49)), 3e-4, rtol=1e-6)
    no_warmup = optim.learning_rate_schedule(3e-4, 0, 50, "cosine", final_fraction=0.5)
    np.testing.assert_allclose(float(no_warmup(0)), 3e-4, rtol=1e-6)
    np.testing.assert_allclose(float(no_warmup(50)), 1.5e-4, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"peak": 0.0}, "peak=0.0"),
        ({"warmup_steps": 200}, "warmup_steps=200"),
        ({"kind": "linear"}, "kind='linear'"),
        ({"kind": "wsd", "warmup_steps": 90, "decay_fraction": 0.2}, "exceed total_steps"),
        ({"final_fraction": 1.5}, "final_fraction=1.5"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, match):
    args = {"peak": 1e-3, "warmup_steps": 10, "total_steps": 100, **kwargs}
    with pytest.raises(ValueError, match=match):
        optim.learning_rate_schedule(**args)


# -------------------------------------------------------------------------------------- optimizers


def _toy_dense_params():
    rng = np.random.default_rng(0)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
        "norm": {"scale": jnp.ones((3,), jnp.float32)},
        "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }


def test_clipping_caps_global_norm():
    params = _toy_dense_params()
    # eps=1 makes Adam's first step depend on the gradient's scale (-lr * g / (|g| + 1)); with the
    # usual tiny eps it would be -lr * sign(g) and blind to clipping.
    lr, b1, b2, eps, clip = 1e-2, 0.9, 0.95, 1.0, 1.0
    tx = optim.dense_optimizer(lr, weight_decay=0.0, b1=b1, b2=b2, eps=eps, clip_norm=clip)
    rng = np.random.default_rng(5)
    for scale in (100.0, 0.01):  # above and below the threshold
        grads = jax.tree.map(
            lambda p, s=scale: jnp.asarray(s * rng.normal(size=p.shape), jnp.float32), params
        )
        norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
        factor = min(1.0, clip / norm)
        assert (factor < 1.0) == (scale > 1.0)
        updates, _ = tx.update(grads, tx.init(params), params)
        for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(updates), strict=True):
            g_clipped = np.asarray(g, np.float64) * factor
            expected = _reference_adam_first_step(g_clipped, lr, b1, b2, eps)
            np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-5, atol=1e-9)


def test_weight_decay_only_on_matrices():
    params = _toy_dense_params()
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.95, 1e-8
    tx = optim.dense_optimizer(lr, weight_decay=wd, b1=b1, b2=b2, eps=eps, clip_norm=None)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, decayed in (
        (("dense", "kernel"), True),
        (("norm", "scale"), False),
        (("bias",), False),
    ):
        p, g, u = params, grads, updates
        for key in path:
            p, g, u = p[key], g[key], u[key]
        g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
        expected = _reference_adam_first_step(g, lr, b1, b2, eps)
        if decayed:
            expected = expected - lr * wd * p
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-5, atol=1e-8, err_msg=path)


def test_memory_optimizer_five_times_lr_no_decay():
    base_lr, b1, b2, eps = 1e-3, 0.9, 0.95, 1e-8
    table = jnp.asarray(np.random.default_rng(2).normal(size=(6, 4)), jnp.float32)
    grads = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
    grads[2] = 0.0  # a row not looked up: zero gradient, zero first update
    params = {"engram": {"table": table}}
    sched = optim.learning_rate_schedule(base_lr, 0, 10, "constant")
    for lr_arg in (sched, base_lr):  # schedule and float both scaled
        tx = optim.memory_optimizer(lr_arg, b1=b1, b2=b2, eps=eps)
        updates, _ = tx.update({"engram": {"table": jnp.asarray(grads)}}, tx.init(params), params)
        expected = _reference_adam_first_step(grads.astype(np.float64), 5 * base_lr, b1, b2, eps)
        np.testing.assert_allclose(
            np.asarray(updates["engram"]["table"]), expected, rtol=1e-5, atol=1e-9
        )
        np.testing.assert_array_equal(np.asarray(updates["engram"]["table"][2]), 0.0)


def test_memory_optimizer_rejects_bad_multiplier():
    with pytest.raises(ValueError, match="lr_multiplier=0"):
        optim.memory_optimizer(1e-3, lr_multiplier=0)


# ------------------------------------------------------------------------------------------- split


def _toy_model_params():
    rng = np.random.default_rng(4)

    def a(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {
        "embed": {"embedding": a(10, 4)},
        "layers_0": {"attn": {"kernel": a(4, 4)}, "norm": {"scale": a(4)}},
        "layers_1": {
            "engram": {"table": a(8, 2), "key_kernel": a(4, 2), "conv": {}},
            "mlp": {"kernel": a(4, 8)},
        },
        "layers_2": {"engram_7": {"table": a(5, 2)}},
        "not_engram": {"table": a(3, 2)},
    }


def test_is_memory_path():
    assert optim.is_memory_path("layers_1/engram/table")
    assert optim.is_memory_path("engram_3/table")
    assert not optim.is_memory_path("layers_1/engram/key_kernel")
    assert not optim.is_memory_path("not_engram/table")
    assert not optim.is_memory_path("layers_1/engram/table_scale")


def test_partition_merge_round_trip():
    params = _toy_model_params()
    dense, memory = optim.partition_params(params)
    assert memory == {
        "layers_1": {"engram": {"table": params["layers_1"]["engram"]["table"]}},
        "layers_2": {"engram_7": {"table": params["layers_2"]["engram_7"]["table"]}},
    }
    assert "table" not in dense["layers_1"]["engram"]
    assert "layers_2" not in dense
    assert dense["not_engram"]["table"] is params["not_engram"]["table"]
    merged = optim.merge_params(dense, memory)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert merged["layers_1"]["engram"]["conv"] == {}
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
        assert a is b
    # Separate optimizer states per tree, as in the trainer.
    state = optim.memory_optimizer(1e-3).init(memory)
    assert jax.tree.structure(state[0].mu) == jax.tree.structure(memory)


def test_partition_without_tables_gives_empty_memory():
    params = _toy_model_params()
    dense, memory = optim.partition_params(params, pattern=r"no_such_module/table$")
    assert memory == {}
    assert optim.merge_params(dense, memory) == params


def test_merge_rejects_overlap_and_non_dicts():
    params = _toy_model_params()
    dense, memory = optim.partition_params(params)
    with pytest.raises(ValueError, match="layers_1/engram/table"):
        optim.merge_params(params, memory)
    with pytest.raises(TypeError, match="params"):
        optim.partition_params([1, 2])
    del dense


def test_wsd_decay_length_is_rounded():
    # The wsd decay length is rounded: 0.25 * 10 = 2.5 -> 2 (Python banker's rounding) decay steps.
    sched = optim.learning_rate_schedule(1.0, 0, 10, "wsd", final_fraction=0.0, decay_fraction=0.25)
    assert math.isclose(float(sched(8)), 1.0, rel_tol=1e-6)
    assert math.isclose(float(sched(9)), 0.5, rel_tol=1e-6)


def test_decay_mask_by_name_covers_stream_gains_and_scanned_vectors():
    params = {
        "layer_1": {
            "engram": {
                "key_norm_scale": jnp.ones((4, 8)),  # [G, D] gain
                "key_bias": jnp.zeros((4, 8)),
                "key_kernel": jnp.ones((16, 4, 8)),
            },
            "ffn_hc": {"b_res": jnp.zeros((4, 4)), "phi_res": jnp.zeros((32, 16))},
        },
        "layers_2_to_3": {
            "attention_hc": {"norm": {"scale": jnp.ones((2, 8))}, "b_pre": jnp.ones((2, 4))}
        },
        "embed": {"embedding": jnp.ones((10, 8))},
    }
    mask = optim.decay_mask(params)
    assert mask["layer_1"]["engram"] == {
        "key_norm_scale": False,
        "key_bias": False,
        "key_kernel": True,
    }
    assert mask["layer_1"]["ffn_hc"] == {"b_res": False, "phi_res": True}
    assert mask["layers_2_to_3"]["attention_hc"] == {"norm": {"scale": False}, "b_pre": False}
    assert mask["embed"]["embedding"] is True
