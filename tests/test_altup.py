"""AltUp (`hc.kind="altup"`): predict / correct and the stream ends against float64 numpy, K = 1
equal to the plain residual, causality and the diagnostics, at the shipped tiny_altup defaults."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.accounting import account
from engram_jax.altup import AltUp, AltUpStreams, active_block, clip_forward
from engram_jax.config import ConfigError, load_config_file, validate
from engram_jax.configs import config_path
from engram_jax.model import Transformer, mixing_matrices

B, T, D, K = 2, 5, 16, 4


@pytest.fixture(scope="module")
def shipped():
    """The model config of configs/tiny_altup.py, as shipped."""
    return validate(load_config_file(config_path("tiny_altup"))).model


def _rms_norm64(x, scale, eps):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * scale


def _random_params(module, x, seed):
    """The module's parameters, each replaced by random values (init values are too special:
    zeros and identities would hide a wrong layout)."""
    params = nn.meta.unbox(module.init(jax.random.key(0), x, method=module.predict))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.5, p.shape), jnp.float32), params)


def _reference_layer(params, x, computed, coefficients, j, eps, clip):
    """float64 numpy: x_hat = P x, then x_i <- x_hat_i + c_i (computed - x_hat_j)."""
    x = np.asarray(x, np.float64)
    computed = np.asarray(computed, np.float64)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    if coefficients == "static":
        x_hat = np.einsum("ij,btjd->btid", p["prediction"], x)
        return (
            x_hat + p["correction"][None, None, :, None] * (computed - x_hat[:, :, j])[:, :, None]
        )

    def router(z):
        return np.tanh(_rms_norm64(z, p["router_norm"], eps) / z.shape[-1] @ p["router"])

    c_pred = np.clip(p["prediction"], -clip, clip)
    c_corr = np.clip(p["correction"], -clip, clip)
    coefs = (router(x[:, :, j]) @ c_pred).reshape(B, T, K, K)
    x_hat = x + np.einsum("btij,btjd->btid", coefs, x)
    c = router(computed) @ c_corr + 1.0
    return x_hat + c[..., None] * (computed - x_hat[:, :, j])[:, :, None]


@pytest.mark.parametrize(
    "coefficients, active, layer", [("dynamic", 0, 3), ("static", -1, 5), ("dynamic", -1, 2)]
)
def test_predict_correct_match_numpy(shipped, coefficients, active, layer):
    eps, clip = shipped.norm_eps, 0.7  # a clip the random weights exceed
    module = AltUp(
        K, D, layer=layer, active=active, coefficients=coefficients, coef_clip=clip, norm_eps=eps
    )
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32)
    computed = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    params = _random_params(module, x, seed=2)

    def layer_fn(mdl, x, computed):
        x_hat, active_in = mdl.predict(x)
        return mdl.correct(x_hat, computed), active_in, x_hat

    out, active_in, x_hat = module.apply({"params": params}, x, computed, method=layer_fn)
    j = active_block(layer, K, active)
    expected = _reference_layer(params, x, computed, coefficients, j, eps, clip)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(active_in)[:, :, 0], np.asarray(x_hat)[:, :, j])


def test_streams_expand_and_merge_match_numpy():
    module = AltUpStreams(K, D)
    rng = np.random.default_rng(3)
    emb = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    params = nn.meta.unbox(module.init(jax.random.key(0), emb, method=module.expand))["params"]
    blocks = module.apply({"params": params}, emb, method=module.expand)
    x = np.asarray(emb, np.float64)

    def rescale(y, target):
        target_rms = np.sqrt(np.mean(target**2, -1, keepdims=True))
        return y * target_rms / np.sqrt(np.maximum(np.mean(y**2, -1, keepdims=True), 1e-5))

    proj_in = np.asarray(params["expand_proj"], np.float64)  # [K-1, D, D]
    expected = [x] + [rescale(x @ proj_in[i], x) for i in range(K - 1)]
    np.testing.assert_allclose(np.asarray(blocks), np.stack(expected, 2), rtol=1e-5, atol=1e-5)

    streams = rng.normal(size=(B, T, K, D))
    merged = module.apply(
        {"params": params}, jnp.asarray(streams, jnp.float32), method=module.merge
    )
    proj_out = np.asarray(params["merge_proj"], np.float64)
    back = [streams[:, :, 0]] + [
        rescale(streams[:, :, i + 1] @ proj_out[i], streams[:, :, 0]) for i in range(K - 1)
    ]
    np.testing.assert_allclose(np.asarray(merged), np.mean(back, 0), rtol=1e-5, atol=1e-5)


def test_clip_forward_clips_values_and_passes_gradients():
    w = jnp.asarray([-3.0, -0.5, 0.2, 4.0])
    np.testing.assert_array_equal(clip_forward(w, 1.0), np.float32([-1.0, -0.5, 0.2, 1.0]))
    grad = jax.grad(lambda w: jnp.sum(clip_forward(w, 1.0) * jnp.arange(4.0)))(w)
    np.testing.assert_array_equal(grad, [0.0, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(clip_forward(w, 0.0), w)


def _without_altup(params: dict) -> dict:
    """The parameters of the same model minus AltUp's own (K = 1 has no stream projections)."""
    out = {}
    for name, value in params.items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "altup"}
        out[name] = value
    return out


@pytest.mark.parametrize("coefficients", ["static", "dynamic"])
def test_one_block_equals_the_plain_residual(shipped, coefficients):
    hc = dataclasses.replace(shipped.hc, n_streams=1, altup_coefficients=coefficients)
    altup_cfg = dataclasses.replace(shipped, hc=hc)
    residual_cfg = dataclasses.replace(shipped, hc=dataclasses.replace(hc, kind="residual"))
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, shipped.vocab_size, (B, T)), jnp.int32)
    e = shipped.engram
    hash_ids = jnp.asarray(rng.integers(0, 100, (B, len(e.layer_ids), T, e.num_heads)), jnp.int32)
    variables = nn.meta.unbox(
        Transformer(altup_cfg).init(jax.random.key(0), tokens, hash_ids=hash_ids)
    )
    altup_logits, _ = Transformer(altup_cfg).apply(variables, tokens, hash_ids=hash_ids)
    plain = {**variables, "params": _without_altup(variables["params"])}
    residual_logits, _ = Transformer(residual_cfg).apply(plain, tokens, hash_ids=hash_ids)
    # x_hat + 1 * (x_tilde - x_hat) rounds differently from x_tilde: equal to float32 rounding.
    np.testing.assert_allclose(altup_logits, residual_logits, rtol=0, atol=2e-5)
    assert altup_logits.shape == (B, T, shipped.vocab_size)


@pytest.fixture(scope="module")
def shipped_model(shipped):
    rng = np.random.default_rng(5)
    t = 8
    tokens = rng.integers(0, shipped.vocab_size, (B, t)).astype(np.int32)
    e = shipped.engram
    hash_ids = rng.integers(0, 100, (B, len(e.layer_ids), t, e.num_heads)).astype(np.int32)
    model = Transformer(shipped, sow_mixing=True)
    variables = nn.meta.unbox(model.init(jax.random.key(0), tokens, hash_ids=hash_ids))
    # Move the coefficients off their init so that the checks see real mixing.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.1 * jnp.ones_like(v) if "altup" in jax.tree_util.keystr(path) else v,
        variables,
    )
    apply = jax.jit(
        lambda v, toks, ids: model.apply(v, toks, hash_ids=ids, mutable=["intermediates"])
    )
    return model, variables, tokens, hash_ids, apply


@pytest.mark.parametrize("t", [0, 4])
def test_causal(shipped_model, shipped, t):
    _, variables, tokens, hash_ids, apply = shipped_model
    (logits, _), _ = apply(variables, tokens, hash_ids)
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 1) % shipped.vocab_size
    (changed_logits, _), _ = apply(variables, changed, hash_ids)
    np.testing.assert_array_equal(np.asarray(logits)[:, :t], np.asarray(changed_logits)[:, :t])
    assert not np.allclose(np.asarray(logits)[:, t], np.asarray(changed_logits)[:, t])


def test_mixing_matrices_are_the_prediction_operators(shipped_model, shipped):
    _, variables, tokens, hash_ids, apply = shipped_model
    _, inter = apply(variables, tokens, hash_ids)
    h_res = np.asarray(mixing_matrices(shipped, inter["intermediates"]))
    assert h_res.shape == (shipped.num_layers, B * tokens.shape[1], K, K)
    # Layer 0 (no Engram) by hand: I + C_pred(router(x_0)), x_0 = block 0 = the token embedding.
    assert shipped.hc.altup_active_block == 0 and shipped.hc.altup_coefficients == "dynamic"
    assert 0 not in shipped.engram.layer_ids
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
    x0 = p["embed"]["embedding"][tokens].reshape(-1, shipped.hidden_size)  # [X, D]
    a = p["layer_0"]["altup"]
    router = np.tanh(
        _rms_norm64(x0, a["router_norm"], shipped.norm_eps) / shipped.hidden_size @ a["router"]
    )
    clip = shipped.hc.altup_coef_clip
    expected = np.eye(K) + (router @ np.clip(a["prediction"], -clip, clip)).reshape(-1, K, K)
    np.testing.assert_allclose(h_res[0], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(h_res[0], np.eye(K), atol=1e-3)


def test_accounting_counts_the_altup_parameters(shipped):
    tokens = jnp.zeros((1, 8), jnp.int32)
    e = shipped.engram
    hash_ids = jnp.zeros((1, len(e.layer_ids), 8, e.num_heads), jnp.int32)
    for coefficients in ("dynamic", "static"):
        cfg = dataclasses.replace(
            shipped, hc=dataclasses.replace(shipped.hc, altup_coefficients=coefficients)
        )
        shapes = jax.eval_shape(
            lambda cfg=cfg: Transformer(cfg).init(jax.random.key(0), tokens, hash_ids=hash_ids)
        )
        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
        assert account(cfg, 8).total_params == count


def test_bad_altup_settings_name_the_field():
    config = load_config_file(config_path("tiny_altup"))
    config.model.hc.altup_active_block = 4
    config.model.hc.altup_coefficients = "learned"
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert "model.hc.altup_active_block" in str(err.value)
    assert "model.hc.altup_coefficients" in str(err.value)


def test_altup_parameters_carry_logical_axes_the_rules_map(shipped):
    from jax.sharding import PartitionSpec

    from engram_jax.sharding import DEFAULT_RULES

    tokens = jnp.zeros((1, 8), jnp.int32)
    e = shipped.engram
    hash_ids = jnp.zeros((1, len(e.layer_ids), 8, e.num_heads), jnp.int32)
    boxed = jax.eval_shape(
        lambda: Transformer(shipped).init(jax.random.key(0), tokens, hash_ids=hash_ids)
    )["params"]
    altup_leaves = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )
        if "altup" in jax.tree_util.keystr(path)
    }
    assert len(altup_leaves) == 2 + 4 * shipped.num_layers  # streams; norm, router, P, C per layer
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in altup_leaves.values())
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), DEFAULT_RULES)
    # The D x D stream projections split their input width over fsdp like every embed axis.
    assert specs["altup_streams"]["expand_proj"] == PartitionSpec(None, "fsdp", None)
    assert specs["layer_0"]["altup"]["router"] == PartitionSpec("fsdp", None)
