"""MatFormer nested FFNs: the full granularity is the plain FFN bit for bit, every slice of the
dense FFN and of the MoE against float64 numpy, the per-step granularity, and sliced models of the
shipped tiny_matformer config (standalone, counted as the accounting counts them)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import matformer, matformer_slice
from engram_jax.accounting import account, slice_counts
from engram_jax.config import ConfigError, load_config_file, validate
from engram_jax.configs import config_path
from engram_jax.model import Transformer
from engram_jax.moe import MLP, MoE

X, D, F = 6, 8, 16
WIDTHS = (2, 4, 8, 16)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _swiglu64(x, w_gate, w_up, w_down, m):
    return (_silu(x @ w_gate[:, :m]) * (x @ w_up[:, :m])) @ w_down[:m]


@pytest.fixture(scope="module")
def mlp_setup():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(X, D)), jnp.float32)
    params = MLP(F).init(jax.random.key(0), x)["params"]
    return x, nn.meta.unbox(params)


def test_full_granularity_is_the_plain_ffn_bit_for_bit(mlp_setup):
    x, params = mlp_setup
    plain = jax.jit(lambda p, x: MLP(F).apply({"params": p}, x))(params, x)
    for granularity in (None, len(WIDTHS) - 1):
        nested = MLP(F, nested_widths=WIDTHS, granularity=granularity)
        out = jax.jit(lambda p, x, m=nested: m.apply({"params": p}, x))(params, x)
        np.testing.assert_array_equal(out, plain)

    @jax.jit
    def traced(p, x, g):
        return MLP(F, nested_widths=WIDTHS, granularity=g).apply({"params": p}, x)

    np.testing.assert_array_equal(traced(params, x, jnp.int32(len(WIDTHS) - 1)), plain)


def test_each_dense_slice_matches_numpy(mlp_setup):
    x, params = mlp_setup
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}

    @jax.jit
    def traced(p, x, g):
        return MLP(F, nested_widths=WIDTHS, granularity=g).apply({"params": p}, x)

    for g, m in enumerate(WIDTHS):
        expected = _swiglu64(
            np.asarray(x, np.float64), p64["w_gate"], p64["w_up"], p64["w_down"], m
        )
        static = MLP(F, nested_widths=WIDTHS, granularity=g).apply({"params": params}, x)
        np.testing.assert_allclose(static, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(traced(params, x, jnp.int32(g)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_each_moe_slice_matches_numpy(dispatch):
    e, k, s = 4, 2, 1
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, D)), jnp.float32)

    def moe(g):
        # capacity E/K: nothing is dropped, so the numpy reference (dropless) applies.
        return MoE(
            e,
            k,
            F,
            num_shared_experts=s,
            dispatch=dispatch,
            capacity_factor=e / k,
            nested_widths=WIDTHS,
            granularity=g,
        )

    variables = nn.meta.unbox(moe(None).init(jax.random.key(0), x))
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
    x64 = np.asarray(x, np.float64).reshape(-1, D)
    scores = 1.0 / (1.0 + np.exp(-(x64 @ p["router_kernel"])))  # [X, E], bias 0 at init
    top = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    for g, m in enumerate(WIDTHS):
        y, _ = moe(g).apply(variables, x)
        expected = _swiglu64(
            x64, p["shared"]["w_gate"], p["shared"]["w_up"], p["shared"]["w_down"], s * m
        )
        for row in range(x64.shape[0]):
            chosen = scores[row, top[row]]
            for expert, gate in zip(top[row], chosen / chosen.sum(), strict=True):
                expected[row] += gate * _swiglu64(
                    x64[row], p["w_gate"][expert], p["w_up"][expert], p["w_down"][expert], m
                )
        np.testing.assert_allclose(np.asarray(y).reshape(-1, D), expected, rtol=1e-4, atol=1e-5)


def _toy_loss(params, memory, moe_bias, batch):
    """A loss that is its granularity index, to see which ones `per_step_loss` asks for."""
    g = batch["ffn_granularity"].astype(jnp.float32)
    return g * 10.0, (g, {"granularity": g}, moe_bias)


@pytest.fixture(scope="module")
def shipped():
    return validate(load_config_file(config_path("tiny_matformer"))).model


def test_per_step_granularity_sample_and_all(shipped):
    import dataclasses

    g = len(shipped.matformer.granularities)
    assert shipped.matformer.sampling == "sample"
    picks = [
        int(matformer.per_step_loss(_toy_loss, shipped, jnp.int32(step))(None, None, {}, {})[1][0])
        for step in range(64)
    ]
    assert set(picks) == set(range(g))  # every prefix gets trained
    again = [
        int(matformer.sample_granularity(shipped.matformer, jnp.int32(step))) for step in range(64)
    ]
    assert picks == again  # a function of the step alone: a resumed run draws the same

    every = dataclasses.replace(
        shipped, matformer=dataclasses.replace(shipped.matformer, sampling="all")
    )
    total, (loss, aux, _) = matformer.per_step_loss(_toy_loss, every, jnp.int32(0))(
        None, None, {}, {}
    )
    assert float(total) == pytest.approx(10.0 * np.mean(range(g)))
    assert float(loss) == pytest.approx(np.mean(range(g)))
    assert float(aux["granularity"]) == g - 1  # aux of the full width
    off = dataclasses.replace(
        shipped, matformer=dataclasses.replace(shipped.matformer, granularities=())
    )
    assert matformer.per_step_loss(_toy_loss, off, jnp.int32(0)) is _toy_loss


@pytest.fixture(scope="module")
def shipped_model(shipped):
    rng = np.random.default_rng(2)
    b, t = 2, 8
    tokens = rng.integers(0, shipped.vocab_size, (b, t)).astype(np.int32)
    e = shipped.engram
    hash_ids = rng.integers(0, 100, (b, len(e.layer_ids), t, e.num_heads)).astype(np.int32)
    variables = nn.meta.unbox(
        Transformer(shipped).init(jax.random.key(0), tokens, hash_ids=hash_ids)
    )
    return tokens, hash_ids, variables


def _count(tree) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(tree))


def test_slices_are_standalone_models_counted_by_the_accounting(shipped, shipped_model):
    import dataclasses

    tokens, hash_ids, variables = shipped_model
    acc = account(shipped, 8)
    assert _count(variables["params"]) == acc.total_params
    assert [s[0] for s in acc.matformer_slices] == list(shipped.matformer.granularities)
    traced = jax.jit(
        lambda v, g: Transformer(shipped).apply(v, tokens, hash_ids=hash_ids, ffn_granularity=g)[0]
    )
    for g in range(len(shipped.matformer.granularities)):
        sliced = matformer_slice.slice_params(variables["params"], shipped, g)
        assert _count(sliced) == acc.matformer_slices[g][1]
        # The slice runs as a plain model of the smaller widths, without MatFormer...
        small = matformer_slice.slice_config(shipped, g)
        assert account(small, 8).total_params == acc.matformer_slices[g][1]
        small_logits, _ = Transformer(small).apply(
            {**variables, "params": sliced}, tokens, hash_ids=hash_ids
        )
        # ...and equals the full model run at that granularity (static, or traced as in training).
        picked = dataclasses.replace(
            shipped, matformer=dataclasses.replace(shipped.matformer, inference_granularity=(g,))
        )
        logits, _ = Transformer(picked).apply(variables, tokens, hash_ids=hash_ids)
        np.testing.assert_array_equal(small_logits, logits)
        np.testing.assert_allclose(traced(variables, jnp.int32(g)), logits, rtol=1e-5, atol=1e-5)

    mix = (0, 3, 1, 2)  # Mix'n'Match: one granularity per layer
    assert (
        _count(matformer_slice.slice_params(variables["params"], shipped, mix))
        == slice_counts(shipped, mix)[0]
    )


def test_bad_matformer_settings_name_the_field():
    config = load_config_file(config_path("tiny_matformer"))
    config.model.matformer.granularities = (0.5, 0.25)
    config.model.matformer.sampling = "sum"
    config.model.matformer.inference_granularity = (0, 1)
    with pytest.raises(ConfigError) as err:
        validate(config)
    for field in ("granularities", "sampling", "inference_granularity"):
        assert f"model.matformer.{field}" in str(err.value)
