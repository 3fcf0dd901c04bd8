"""Tests of the decoder LM (`engram_jax.model`) with Engram + mHC + MoE switched on.

Every test uses one small config (4 layers, D=32, 4 heads / 2 KV heads of width 8, vocab 64, MoE
with 4 experts top-2 after one dense layer, Engram at layer 1, mHC with 4 streams), B=2, T=16.
Compiled functions live in module-level fixtures so that each is traced once.

The MoE runs its default "dropless" dispatch, where no token is dropped and a token's output
depends on that token alone, so causality, packing and cached decoding hold exactly as configured.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from engram_jax.config import ModelConfig, base_config, validate
from engram_jax.hashing import NgramHasher
from engram_jax.model import (
    MOE_BIAS,
    Transformer,
    cross_entropy_loss,
    engram_table_sizes,
    layer_runs,
    mixing_matrices,
)

B, T = 2, 16
VOCAB = 64


def _config(**overrides) -> ModelConfig:
    """The small test model; `overrides` maps dotted keys under `model` to values."""
    c = base_config()
    m = c.model
    m.update(vocab_size=VOCAB, num_layers=4, hidden_size=32, mlp_hidden_size=64)
    m.num_dense_layers = 1
    m.attention.update(num_heads=4, num_kv_heads=2, head_dim=8)
    m.attention.update(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    m.moe.update(num_experts=4, top_k=2, expert_hidden_size=16)
    m.engram.update(layer_ids=(1,), max_ngram=3, heads_per_ngram=2, embed_per_ngram=16)
    m.engram.table_rows_per_head = (31, 37)
    m.hc.update(kind="mhc", n_streams=4)
    m.update_from_flattened_dict(overrides)
    return validate(c).model


def _init_decoder(cfg: ModelConfig):
    """A decode-mode model initialised on random tokens and hash ids: `(model, tokens, hash_ids,
    full_logits, variables)`. decode=True on a full-length input is the ordinary forward pass
    plus zero caches of length T."""
    model = Transformer(cfg, decode=True)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, VOCAB, size=(B, T)).astype(np.int32)
    hash_ids = _random_hash_ids(cfg, rng)
    full_logits, variables = jax.jit(model.init_with_output)(
        jax.random.key(1), tokens, None, None, hash_ids
    )
    return model, tokens, hash_ids, np.asarray(full_logits[0]), nn.meta.unbox(variables)


def _random_hash_ids(cfg: ModelConfig, rng: np.random.Generator, t: int = T) -> np.ndarray:
    """Uniform ids in each head's range: `[B, L_e, T, M]` int32."""
    sizes = engram_table_sizes(cfg)
    per_layer = [
        rng.integers(0, np.asarray(sizes[layer]), size=(B, t, len(sizes[layer])))
        for layer in cfg.engram.layer_ids
    ]
    return np.stack(per_layer, axis=1).astype(np.int32)  # L_e x [B, T, M] -> [B, L_e, T, M]


def _hasher(cfg: ModelConfig) -> NgramHasher:
    e = cfg.engram
    return NgramHasher(
        e.table_rows_per_head,
        e.max_ngram,
        e.heads_per_ngram,
        e.layer_ids,
        token_vocab_size=cfg.vocab_size,
        pad_id=0,  # the config's -1 means "the tokenizer's pad"; there is no tokenizer here
        seed=e.hash_seed,
    )


def _hash(cfg: ModelConfig, tokens_BT: np.ndarray, segment_ids_BT: np.ndarray) -> np.ndarray:
    ids = _hasher(cfg).hash_all(tokens_BT, segment_ids_BT)
    return np.stack([ids[layer] for layer in cfg.engram.layer_ids], axis=1)  # [B, L_e, T, M]


class _Setup:
    """One config with its model, unboxed variables and a jitted apply (moe_bias mutable)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        self.cfg = cfg
        self.model = Transformer(cfg)
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(0, VOCAB, size=(B, T)).astype(np.int32)
        self.hash_ids = _random_hash_ids(cfg, rng)
        self.variables = nn.meta.unbox(
            jax.jit(self.model.init)(jax.random.key(seed), self.tokens, None, None, self.hash_ids)
        )

        def apply(variables, tokens, positions, segment_ids, hash_ids):
            return self.model.apply(
                variables, tokens, positions, segment_ids, hash_ids, mutable=[MOE_BIAS]
            )

        # Returns ((logits, aux), {"moe_bias": updated}); the update exercises the bias path.
        self.apply = jax.jit(apply)

    def run(self, tokens, hash_ids, positions=None, segment_ids=None, variables=None):
        """`self.apply` with explicit positions and segment ids, so that it is traced once."""
        b, t = tokens.shape
        if positions is None:
            positions = np.broadcast_to(np.arange(t, dtype=np.int32)[None, :], (b, t))
        if segment_ids is None:
            segment_ids = np.ones((b, t), np.int32)
        variables = self.variables if variables is None else variables
        return self.apply(variables, tokens, positions, segment_ids, hash_ids)

    def logits(self, tokens, hash_ids, positions=None, segment_ids=None) -> np.ndarray:
        (logits, _), _ = self.run(tokens, hash_ids, positions, segment_ids)
        return np.asarray(logits)


@pytest.fixture(scope="module")
def base() -> _Setup:
    return _Setup(_config())


# ------------------------------------------------------------------------------------------------
# Structure.
# ------------------------------------------------------------------------------------------------


def test_layer_runs_and_outputs(base):
    assert [r.name for r in layer_runs(base.cfg)] == ["layer_0", "layer_1", "layer_2", "layer_3"]
    scanned = _config(scan_layers=True)
    assert [r.name for r in layer_runs(scanned)] == ["layer_0", "layer_1", "layers_2_to_3"]
    (logits, aux), updates = base.run(base.tokens, base.hash_ids)
    assert logits.shape == (B, T, VOCAB) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert aux["moe_load"].shape == (3, 4)  # [L_moe, E], each row sums to 1
    np.testing.assert_allclose(np.sum(aux["moe_load"], axis=-1), 1.0, rtol=1e-6)
    assert aux["engram_gates"].shape == (1, B, T, 4)  # [L_e, B, T, G]
    assert aux["moe_balance_loss"].shape == ()
    # One loss-free balancing step: every bias moves by +-rate (or 0 at exactly mean load).
    bias = updates[MOE_BIAS]["layer_2"]["moe"]["bias"]
    assert bias.shape == (4,) and np.all(np.abs(bias) <= base.cfg.moe.bias_update_rate + 1e-9)
    assert np.any(bias != 0)


# ------------------------------------------------------------------------------------------------
# Causality and packing.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0, 5, 11])
def test_causal(base, t):
    rng = np.random.default_rng(100 + t)
    tokens, hash_ids = base.tokens.copy(), base.hash_ids.copy()
    # Perturb every token and hash id after t (both are inputs the model reads at t + 1 ...).
    tokens[:, t + 1 :] = (tokens[:, t + 1 :] + rng.integers(1, VOCAB, (B, T - t - 1))) % VOCAB
    perturbed = _random_hash_ids(base.cfg, rng)
    hash_ids[:, :, t + 1 :] = perturbed[:, :, t + 1 :]
    before = base.logits(base.tokens, base.hash_ids)
    after = base.logits(tokens, hash_ids)
    # Positions <= t see the same inputs: equal up to reduction-order noise.
    np.testing.assert_allclose(after[:, : t + 1], before[:, : t + 1], atol=1e-6, rtol=0)
    assert np.max(np.abs(after[:, t + 1] - before[:, t + 1])) > 1e-3  # the test can fail


def test_packed_documents_are_independent(base):
    cfg = base.cfg
    rng = np.random.default_rng(7)
    len_a, len_b = 6, 10
    doc_a = rng.integers(1, VOCAB, len_a).astype(np.int32)
    doc_b = rng.integers(1, VOCAB, len_b).astype(np.int32)
    filler = rng.integers(1, VOCAB, T).astype(np.int32)
    # Alone: each document at the start of its own row; what follows it is invisible (causality).
    alone = np.stack(
        [np.concatenate([doc_a, filler[len_a:]]), np.concatenate([doc_b, filler[len_b:]])]
    )
    alone_seg = np.ones((B, T), np.int32)
    alone_logits = base.logits(alone, _hash(cfg, alone, alone_seg), segment_ids=alone_seg)
    # Packed: [A, B] in row 0 and [B, A] in row 1, positions restarting at every document.
    packed = np.stack([np.concatenate([doc_a, doc_b]), np.concatenate([doc_b, doc_a])])
    seg = np.array([[1] * len_a + [2] * len_b, [1] * len_b + [2] * len_a], np.int32)
    positions = np.array(
        [list(range(len_a)) + list(range(len_b)), list(range(len_b)) + list(range(len_a))],
        np.int32,
    )
    hash_ids = _hash(cfg, packed, seg)  # n-gram windows stop at document starts
    packed_logits = base.logits(packed, hash_ids, positions, seg)
    tol = dict(atol=1e-5, rtol=1e-5)  # different row contents change reduction order only
    np.testing.assert_allclose(packed_logits[0, :len_a], alone_logits[0, :len_a], **tol)
    np.testing.assert_allclose(packed_logits[0, len_a:], alone_logits[1, :len_b], **tol)
    np.testing.assert_allclose(packed_logits[1, :len_b], alone_logits[1, :len_b], **tol)
    np.testing.assert_allclose(packed_logits[1, len_b:], alone_logits[0, :len_a], **tol)
    # Without segment ids the second document attends to the first: the test can fail.
    leaky = base.logits(packed, hash_ids, positions, np.ones((B, T), np.int32))
    assert np.max(np.abs(leaky[0, len_a:] - alone_logits[1, :len_b])) > 1e-3


# ------------------------------------------------------------------------------------------------
# Cached decoding.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_cached_decoding_matches_full_forward(kind):
    # gqa: two layers (attention caches in both, Engram's conv state and MoE in layer 1) and a
    # prefill chunk. mla: one Engram + MoE block, token by token only (one compile less).
    if kind == "gqa":
        cfg = _config(num_layers=2, **{"attention.kind": kind})
    else:
        cfg = _config(
            num_layers=1, num_dense_layers=0, **{"attention.kind": kind, "engram.layer_ids": (0,)}
        )
    model, tokens, hash_ids, full_logits, variables = _init_decoder(cfg)
    params = {k: v for k, v in variables.items() if k != "cache"}
    fresh_cache = variables["cache"]
    engram_layer = f"layer_{cfg.engram.layer_ids[0]}"
    assert set(fresh_cache[engram_layer]) == {"attention", "engram"}  # KV or latent; conv state

    @jax.jit
    def step(cache, tokens_BT, positions_BT, hash_ids):
        (logits, _), updates = model.apply(
            {**params, "cache": cache}, tokens_BT, positions_BT, None, hash_ids, mutable=["cache"]
        )
        return logits, updates["cache"]

    def run(chunks):
        cache, outputs = fresh_cache, []
        for start, stop in chunks:
            positions = np.broadcast_to(np.arange(start, stop, dtype=np.int32), (B, stop - start))
            logits, cache = step(
                cache, tokens[:, start:stop], positions, hash_ids[:, :, start:stop]
            )
            outputs.append(np.asarray(logits))
        return np.concatenate(outputs, axis=1)  # [B, T, V]

    # f32 throughout; only the attention's reduction over S (masked cache slots) differs.
    tol = dict(atol=1e-4, rtol=0)
    one_by_one = run([(i, i + 1) for i in range(T)])
    np.testing.assert_allclose(one_by_one, full_logits, **tol)
    if kind == "mla":
        return
    prefill = 5
    chunked = run([(0, prefill)] + [(i, i + 1) for i in range(prefill, T)])
    np.testing.assert_allclose(chunked, full_logits, **tol)


# ------------------------------------------------------------------------------------------------
# scan_layers and remat.
# ------------------------------------------------------------------------------------------------


def _to_scanned(tree: dict, cfg: ModelConfig) -> dict:
    """Maps an unscanned per-layer tree (`layer_{i}`) to the `scan_layers=True` layout."""
    out = {k: v for k, v in tree.items() if not k.startswith("layer")}
    for run in layer_runs(cfg):
        names = [f"layer_{i}" for i in range(run.start, run.stop)]
        present = [tree[n] for n in names if n in tree]
        if not present:
            continue
        if run.stop - run.start == 1:
            out[run.name] = present[0]
        else:
            out[run.name] = jax.tree.map(lambda *xs: jnp.stack(xs, axis=0), *present)  # [L, ...]
    return out


@pytest.fixture(scope="module")
def scanned_cfg() -> ModelConfig:
    return _config(scan_layers=True)


def test_scan_layers_matches_unscanned(base, scanned_cfg):
    rng = np.random.default_rng(11)
    variables = dict(base.variables)
    # Non-zero balancing biases, so that the moe_bias mapping and its update are exercised.
    variables[MOE_BIAS] = jax.tree.map(
        lambda b: jnp.asarray(rng.normal(0.0, 0.05, b.shape), b.dtype), variables[MOE_BIAS]
    )
    scanned_vars = {k: _to_scanned(v, scanned_cfg) for k, v in variables.items()}
    scanned_model = Transformer(scanned_cfg)
    shapes = jax.eval_shape(
        scanned_model.init, jax.random.key(0), base.tokens, None, None, base.hash_ids
    )
    assert jax.tree.structure(nn.meta.unbox(shapes)) == jax.tree.structure(scanned_vars)
    assert jax.tree.map(lambda s: s.shape, nn.meta.unbox(shapes)) == jax.tree.map(
        jnp.shape, scanned_vars
    )

    (logits, aux), updates = base.run(base.tokens, base.hash_ids, variables=variables)
    (s_logits, s_aux), s_updates = jax.jit(
        lambda v, tok, h: scanned_model.apply(v, tok, None, None, h, mutable=[MOE_BIAS])
    )(scanned_vars, base.tokens, base.hash_ids)
    tol = dict(atol=1e-5, rtol=1e-5)  # same maths; scan may fuse differently
    np.testing.assert_allclose(s_logits, logits, **tol)
    for key in aux:
        np.testing.assert_allclose(s_aux[key], aux[key], **tol)
    np.testing.assert_allclose(
        s_updates[MOE_BIAS]["layers_2_to_3"]["moe"]["bias"][1],
        updates[MOE_BIAS]["layer_3"]["moe"]["bias"],
        atol=1e-7,
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
        s_updates[MOE_BIAS],
        _to_scanned(updates[MOE_BIAS], scanned_cfg),
    )


def _loss_fn(model: Transformer):
    def loss(params, moe_bias, tokens, hash_ids):
        (logits_BTV, aux), updates = model.apply(
            {"params": params, MOE_BIAS: moe_bias},
            tokens,
            None,
            None,
            hash_ids,
            mutable=[MOE_BIAS],
        )
        mask_BT = jnp.ones(tokens[:, 1:].shape, jnp.float32)
        ce, _ = cross_entropy_loss(logits_BTV[:, :-1], tokens[:, 1:], mask_BT)
        return ce + aux["moe_balance_loss"], updates[MOE_BIAS]

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def base_grad(base):
    return _loss_fn(base.model)


def test_remat_same_loss_and_gradients(base, base_grad):
    # remat together with scan_layers: nn.remat inside nn.scan and around single layers.
    cfg = _config(remat=True, scan_layers=True)
    v = base.variables
    (loss, bias), grads = base_grad(v["params"], v[MOE_BIAS], base.tokens, base.hash_ids)
    remat_grad = _loss_fn(Transformer(cfg))
    (r_loss, r_bias), r_grads = remat_grad(
        _to_scanned(v["params"], cfg), _to_scanned(v[MOE_BIAS], cfg), base.tokens, base.hash_ids
    )
    np.testing.assert_allclose(r_loss, loss, rtol=1e-6)
    # Recomputation repeats the same f32 ops; scan may change fusion, hence not bit-exact.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
        r_grads,
        _to_scanned(grads, cfg),
    )
    jax.tree.map(np.testing.assert_array_equal, r_bias, _to_scanned(bias, cfg))
    assert np.any(np.asarray(grads["layer_1"]["engram"]["table"]) != 0)


def test_overfits_one_batch(base, base_grad):
    """Engram + mHC + MoE memorise 2 x 15 next tokens: final loss < 0.1 (from ~ln 64 = 4.2)."""
    optimizer = optax.adam(1e-2)
    params, moe_bias = base.variables["params"], base.variables[MOE_BIAS]
    opt_state = optimizer.init(params)

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    losses = []
    for _ in range(200):
        (loss, moe_bias), grads = base_grad(params, moe_bias, base.tokens, base.hash_ids)
        params, opt_state = update(params, opt_state, grads)
        losses.append(float(loss))
    assert losses[0] > 3.0
    assert losses[-1] < 0.1, losses[-10:]
    # The loss-free balancing bias moved (the update ran inside the loop).
    assert np.max(np.abs(moe_bias["layer_2"]["moe"]["bias"])) > 0


# ------------------------------------------------------------------------------------------------
# Variants: hyper-connection kinds, bf16.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, n_streams", [("residual", 1), ("hc", 4), ("mhc_lite", 3)])
def test_hc_kinds_build_and_run(kind, n_streams):
    # mhc (n=4) is the base config of every other test; one Engram + MoE block keeps the compile
    # short.
    cfg = _config(
        num_layers=1,
        num_dense_layers=0,
        **{"engram.layer_ids": (0,), "hc.kind": kind, "hc.n_streams": n_streams},
    )
    model = Transformer(cfg)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, VOCAB, size=(B, T)).astype(np.int32)
    hash_ids = _random_hash_ids(cfg, rng)

    @jax.jit
    def init_and_apply(key):
        variables = model.init(key, tokens, None, None, hash_ids)
        return model.apply(variables, tokens, None, None, hash_ids), variables

    (logits, aux), variables = init_and_apply(jax.random.key(0))
    assert logits.shape == (B, T, VOCAB) and np.all(np.isfinite(logits))
    assert aux["engram_gates"].shape == (1, B, T, n_streams)
    hc_params = nn.meta.unbox(variables)["params"]["layer_0"]["ffn_hc"]
    assert ("phi_res" in hc_params) == (kind == "mhc_lite")  # mhc_lite: [G, D, n!]
    if kind == "mhc_lite":
        assert hc_params["phi_res"].shape == (3, 32, 6)


def test_bfloat16_close_to_float32(base):
    cfg = _config(dtype="bfloat16")
    model = Transformer(cfg)
    (logits, _), _ = jax.jit(
        lambda v, tok, h: model.apply(v, tok, None, None, h, mutable=[MOE_BIAS])
    )(base.variables, base.tokens, base.hash_ids)
    reference = base.logits(base.tokens, base.hash_ids)
    assert logits.dtype == jnp.float32  # logits are cast to f32 whatever the compute dtype
    # bf16 keeps 8 mantissa bits (~4e-3 relative per op). Most logits (|x| up to ~3) move by
    # ~1e-2, but a token whose top-2 experts are nearly tied can route differently in bf16 (a
    # discrete jump, then visible to later positions through attention), so the bound is on the
    # median and mean error, with a loose cap on the worst logit.
    err = np.abs(np.asarray(logits) - reference)
    assert np.median(err) < 0.03, np.median(err)
    assert err.mean() < 0.06, err.mean()
    assert err.max() < 2.0, err.max()


# ------------------------------------------------------------------------------------------------
# Input errors.
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument(base):
    v, tok, h = base.variables, base.tokens, base.hash_ids
    apply = base.model.apply
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    with pytest.raises(ValueError, match="tokens has shape"):
        apply(v, tok[0], None, None, h)
    with pytest.raises(ValueError, match="positions has shape"):
        apply(v, tok, pos[:, :-1], None, h)
    with pytest.raises(ValueError, match="segment_ids has shape"):
        apply(v, tok, pos, pos[:1], h)
    with pytest.raises(ValueError, match=r"hash_ids has shape \(2, 1, 15, 4\)"):
        apply(v, tok, None, None, h[:, :, :-1])
    with pytest.raises(ValueError, match="hash_ids has shape None"):
        apply(v, tok, None, None, None)
    with pytest.raises(TypeError, match="tokens has dtype"):
        apply(v, tok.astype(np.float32), None, None, h)
    with pytest.raises(ValueError, match="segment_ids must be None with decode=True"):
        Transformer(base.cfg, decode=True).apply(v, tok, pos, pos, h)
    no_engram = Transformer(_config(**{"engram.layer_ids": ()}))
    with pytest.raises(ValueError, match="hash_ids given"):
        no_engram.init(jax.random.key(0), tok, None, None, h)


# ------------------------------------------------------------------------------------------------
# NNX bridge.
# ------------------------------------------------------------------------------------------------


def test_nnx_bridge_matches_linen():
    # One Engram + MoE + mHC block: the bridge wraps the whole Transformer either way.
    cfg = _config(num_layers=1, num_dense_layers=0, **{"engram.layer_ids": (0,)})
    rng = np.random.default_rng(9)
    tokens = jnp.asarray(rng.integers(0, VOCAB, size=(B, T)), jnp.int32)
    hash_ids = jnp.asarray(_random_hash_ids(cfg, rng))

    @nnx.jit
    def create_and_call():
        module = nnx.bridge.ToNNX(Transformer(cfg), rngs=nnx.Rngs(0))
        # flax 0.12.8: eager sharding would need a mesh; none is set here.
        with nnx.use_eager_sharding(False):
            module.lazy_init(tokens, None, None, hash_ids)
        return module, module(tokens, None, None, hash_ids)

    module, (logits, aux) = create_and_call()
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    linen = Transformer(cfg)
    shapes = jax.eval_shape(linen.init, jax.random.key(0), tokens, None, None, hash_ids)
    assert jax.tree.structure(params) == jax.tree.structure(nn.meta.unbox(shapes["params"]))
    zero_bias = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes[MOE_BIAS]))
    ref_logits, ref_aux = jax.jit(linen.apply)(
        {"params": params, MOE_BIAS: zero_bias}, tokens, None, None, hash_ids
    )
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(aux["moe_load"], ref_aux["moe_load"], atol=1e-7)


@pytest.mark.parametrize("scan", [False, True])
def test_mixing_matrices_in_depth_order(base, scan):
    """Sown h_res of every site, in depth order, equal what each site's HyperConnection computes."""
    cfg = _config(scan_layers=scan)
    model = Transformer(cfg, sow_mixing=True)
    variables = base.variables
    if scan:
        variables = {k: _to_scanned(v, cfg) for k, v in variables.items()}
    _, inter = model.apply(
        variables, base.tokens, None, None, base.hash_ids, mutable=["intermediates"]
    )
    h_res_SXGG = mixing_matrices(cfg, inter["intermediates"])
    assert h_res_SXGG.shape == (2 * cfg.num_layers, B * T, 4, 4)
    # mHC rows are exact convex combinations (row normalisation runs last).
    np.testing.assert_allclose(np.sum(h_res_SXGG, axis=-1), 1.0, atol=1e-5)
    # Site 2l+1 is layer l's FFN: recompute it from that layer's own hyper-connection.
    unscanned = Transformer(base.cfg, sow_mixing=True).apply(
        base.variables, base.tokens, None, None, base.hash_ids, mutable=["intermediates"]
    )[1]["intermediates"]
    ffn_layer3 = unscanned["layer_3"]["ffn_hc"]["h_res"][0].reshape(B * T, 4, 4)
    np.testing.assert_allclose(h_res_SXGG[7], ffn_layer3, atol=1e-6)


def test_hc_kind_is_never_scanned_so_each_layer_reads_its_own_stream():
    cfg = _config(**{"scan_layers": True, "hc.kind": "hc"})
    assert all(run.stop - run.start == 1 for run in layer_runs(cfg))
