"""The DeepSeek-V4.1 forms against float64 numpy references written from the equations
(docs/design.md §14): the Engram layer form "v41", the "mhc_v41" hyper-connection
(Sinkhorn, one site, and the scheduling of read weights across sites), the shipped deepseek_v41
config's accounting, and the library checks that refuse bad input.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from engram_jax import axes
from engram_jax.accounting import account
from engram_jax.config import load_config_file, validate
from engram_jax.configs import config_path
from engram_jax.engram import Engram, head_offsets, signed_sqrt
from engram_jax.hashing import table_primes
from engram_jax.mhc import (
    HyperConnection,
    collapse_streams,
    expand_streams,
    initial_pre,
    sinkhorn,
    sinkhorn_v41,
)

B, T, G, D = 2, 5, 3, 8
MAX_NGRAM, HEADS, W = 3, 2, 4
SIZES = (31, 37, 41, 43)  # M = (3 - 1) x 2 heads
EPS = 1e-6


# ------------------------------------------------------------------------------------------------
# Float64 references, from the equations.
# ------------------------------------------------------------------------------------------------


def _rms_norm64(x, gain, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def _engram_v41_ref(params, hidden, hash_ids, eps, clamp=1e-6):
    """Y[b, t, g] = sigmoid(copysign(sqrt(max(|s|, clamp)), s)) * v, s = <q~, k~> / sqrt(D)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    flat_ids = hash_ids + head_offsets(SIZES)[None, None, :]
    memory = p["table"][flat_ids].reshape(B, T, -1)  # e_t, head-major: [B, T, M*W]
    # The release's torch weight [(G + 1) * D, M*W] is wkv.reshape(M*W, (G + 1) * D).T.
    released = p["wkv"].reshape(memory.shape[-1], (G + 1) * D).T
    kv = memory @ released.T  # [B, T, (G + 1) * D], keys first
    keys = kv[..., : G * D].reshape(B, T, G, D)
    value = kv[..., G * D :]
    h = np.asarray(hidden, np.float64)
    q = _rms_norm64(h, p["q_weight"], eps)
    k = _rms_norm64(keys, p["k_weight"], eps)
    s = np.sum(q * k, axis=-1) / math.sqrt(D)
    gate = 1 / (1 + np.exp(-np.copysign(np.sqrt(np.maximum(np.abs(s), clamp)), s)))
    return gate[..., None] * value[:, :, None, :], gate


def _sinkhorn_v41_ref(logits, iters, eps):
    m = np.exp(logits - logits.max(axis=-1, keepdims=True))
    m = m / m.sum(axis=-1, keepdims=True) + eps  # row softmax + eps
    m = m / (m.sum(axis=-2, keepdims=True) + eps)  # columns
    for _ in range(iters - 1):
        m = m / (m.sum(axis=-1, keepdims=True) + eps)  # rows
        m = m / (m.sum(axis=-2, keepdims=True) + eps)  # columns
    return m


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _mix_ref(p, x, iters, eps, norm_eps):
    """One site's coefficients from its input streams x [B, T, G, D] (float64)."""
    phi = np.concatenate([p["phi_pre"], p["phi_post"], p["phi_res"]], axis=-1)  # [G, D, 2G+G^2]
    raw = np.einsum("btgd,gdk->btk", x, phi)
    coeff = raw / np.sqrt(np.mean(x * x, axis=(2, 3)) + norm_eps)[..., None]
    pre = _sigmoid(p["alpha_pre"] * coeff[..., :G] + p["b_pre"]) + eps
    post = 2 * _sigmoid(p["alpha_post"] * coeff[..., G : 2 * G] + p["b_post"])
    logits = p["alpha_res"] * coeff[..., 2 * G :].reshape(B, T, G, G) + p["b_res"]
    comb = _sinkhorn_v41_ref(logits, iters, eps)
    return pre, post, comb


def _site_ref(p, x, pre_in, sublayer, iters=20, eps=EPS, norm_eps=1e-6):
    """x_next = comb^T x + post * F(RMSNorm(sum_i pre_in[i] x[i])); returns (x_next, pre_out)."""
    pre_out, post, comb = _mix_ref(p, x, iters, eps, norm_eps)
    layer_in = _rms_norm64(np.einsum("btg,btgd->btd", pre_in, x), p["norm"]["scale"], norm_eps)
    y = sublayer(layer_in)
    mixed = np.einsum("btij,btid->btjd", comb, x)  # out[j] = sum_i comb[i, j] x[i]
    return mixed + post[..., None] * y[:, :, None, :], pre_out


def _perturb(tree, seed, sigma=0.5):
    """Every leaf moved by N(0, sigma^2) so that no coefficient sits at its init."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [
        x + sigma * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, moved)


def _to64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# ------------------------------------------------------------------------------------------------
# Engram form "v41".
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engram_v41():
    module = Engram(
        head_vocab_sizes=SIZES,
        max_ngram=MAX_NGRAM,
        row_width=W,
        heads_per_ngram=HEADS,
        form="v41",
        qk_norm_eps=EPS,
    )
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(B, T, G, D)).astype(np.float32)
    hash_ids = rng.integers(0, np.asarray(SIZES), size=(B, T, len(SIZES))).astype(np.int32)
    boxed = module.init(jax.random.key(0), hidden, hash_ids)
    params = _perturb(nn.meta.unbox(boxed)["params"], seed=1)
    apply = jax.jit(
        lambda p, h, ids, blocked: module.apply(
            {"params": p}, h, ids, blocked=blocked, return_gates=True
        )
    )
    return module, boxed, params, hidden, hash_ids, apply


def test_engram_v41_parameters_and_logical_axes(engram_v41):
    _, boxed, params, *_ = engram_v41
    m = len(SIZES)
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    assert shapes == {
        "table": (sum(SIZES), W),
        "wkv": (m * W, G + 1, D),
        "q_weight": (G, D),
        "k_weight": (G, D),
    }
    names = {k: v.names for k, v in boxed["params"].items()}
    assert names["wkv"] == (axes.MEMORY_IN, axes.STREAMS, axes.EMBED)
    assert names["q_weight"] == names["k_weight"] == (axes.STREAMS, axes.NORM)
    assert names["table"] == (axes.TABLE_ROWS, axes.MEMORY_WIDTH)


def test_engram_v41_matches_float64_reference(engram_v41):
    _, _, params, hidden, hash_ids, apply = engram_v41
    out, gates = apply(params, hidden, hash_ids, None)
    ref_out, ref_gates = _engram_v41_ref(params, hidden, hash_ids, EPS)
    np.testing.assert_allclose(np.asarray(gates), ref_gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-4, atol=1e-5)
    # One shared value, scaled per stream: stream ratios are gate ratios.
    assert not np.allclose(ref_gates[..., 0], ref_gates[..., 1])


def test_engram_v41_blocked_positions_add_nothing(engram_v41):
    _, _, params, hidden, hash_ids, apply = engram_v41
    blocked = np.zeros((B, T), bool)
    blocked[0, 1:3] = True
    out, _ = apply(params, hidden, hash_ids, blocked)
    full, _ = apply(params, hidden, hash_ids, np.zeros((B, T), bool))
    out, full = np.asarray(out), np.asarray(full)
    assert np.all(out[0, 1:3] == 0)
    np.testing.assert_array_equal(out[~blocked], full[~blocked])


def test_v41_signed_root_keeps_the_sign_of_zero():
    x = jnp.asarray([0.0, -0.0, 4.0, -1e-9])
    two_way = np.asarray(signed_sqrt(x, 1e-6, two_way=True))
    np.testing.assert_allclose(two_way, [1e-3, -1e-3, 2.0, -1e-3], rtol=1e-6)
    assert np.asarray(signed_sqrt(x, 1e-6))[0] == 0.0  # the demo's three-way sign


def test_engram_refuses_ids_hashed_for_another_max_ngram():
    # 4 heads hashed with max_ngram=3 (2 orders x 2 heads) given to a max_ngram=2 layer.
    module = Engram(head_vocab_sizes=SIZES, max_ngram=2, row_width=W, heads_per_ngram=HEADS)
    hidden = jnp.zeros((1, 2, 1, D))
    with pytest.raises(ValueError, match=r"head_vocab_sizes has 4 entries; expected .* = 2"):
        module.init(jax.random.key(0), hidden, np.zeros((1, 2, 4), np.int32))


def test_out_of_range_ids_under_jit_caught_by_checked_mode():
    module = Engram(
        head_vocab_sizes=SIZES, max_ngram=MAX_NGRAM, row_width=W, form="v41", check_ids=True
    )
    hidden = jnp.ones((1, 2, 1, D))
    good = np.zeros((1, 2, len(SIZES)), np.int32)
    variables = module.init(jax.random.key(0), hidden, good)
    bad = good.copy()
    bad[0, 1, 2] = SIZES[2]  # one past head 2's range
    # Eagerly the host check names the head; under jit the checkify check reports it.
    with pytest.raises(ValueError, match="out of range for head 2"):
        module.apply(variables, hidden, bad)
    checked = checkify.checkify(jax.jit(lambda ids: module.apply(variables, hidden, ids)))
    err, _ = checked(good)
    err.throw()  # in range: no error
    err, _ = checked(bad)
    with pytest.raises(checkify.JaxRuntimeError, match="out of its head's range"):
        err.throw()


# ------------------------------------------------------------------------------------------------
# mHC "mhc_v41".
# ------------------------------------------------------------------------------------------------


def test_sinkhorn_v41_matches_float64_reference():
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(3, 4, 4)) * 3).astype(np.float32)
    got = np.asarray(sinkhorn_v41(jnp.asarray(logits), 20, EPS))
    ref = _sinkhorn_v41_ref(logits.astype(np.float64), 20, EPS)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(axis=-2), 1.0, atol=1e-5)  # ends with the columns
    # Not the paper's iteration (exp start, row last): the two differ at 2 iterations.
    assert not np.allclose(
        np.asarray(sinkhorn_v41(jnp.asarray(logits), 2, EPS)),
        np.asarray(sinkhorn(jnp.asarray(logits), 2)),
        atol=1e-3,
    )


def test_sinkhorn_refuses_non_finite_logits_eagerly_and_gives_nan_under_jit():
    logits = np.zeros((2, 4, 4), np.float32)
    logits[1, 2, 3] = np.nan
    for fn in (sinkhorn, sinkhorn_v41):
        with pytest.raises(ValueError, match=r"logits\[1, 2, 3\] = nan; expected finite"):
            fn(jnp.asarray(logits))
        out = np.asarray(jax.jit(fn)(jnp.asarray(logits)))
        assert np.isnan(out[1]).all() and np.isfinite(out[0]).all()


class _Chain(nn.Module):
    """`sites` mhc_v41 sites with F(u) = tanh(u), each site's read weights from the site before,
    then the final collapse with the last site's weights (as `Transformer` wires them)."""

    sites: int

    @nn.compact
    def __call__(self, x_BTGD):
        b, t, g, _ = x_BTGD.shape
        pre_BTG = initial_pre(b, t, g)
        for i in range(self.sites):
            hc = HyperConnection(
                kind="mhc_v41", n_streams=g, sinkhorn_eps=EPS, layer_index=i, name=f"site_{i}"
            )
            u_BTD, mixing = hc.read(x_BTGD, pre_BTG)
            x_BTGD = hc.write(x_BTGD, jnp.tanh(u_BTD), mixing)
            pre_BTG = mixing.h_pre
        return collapse_streams(x_BTGD, pre_BTG)


def test_mhc_v41_scheduling_matches_float64_reference():
    rng = np.random.default_rng(4)
    emb_BTD = rng.normal(size=(B, T, D)).astype(np.float32)
    x_BTGD = expand_streams(jnp.asarray(emb_BTD), G)
    chain = _Chain(sites=3)
    params = _perturb(
        nn.meta.unbox(chain.init(jax.random.key(0), x_BTGD))["params"], seed=5, sigma=0.3
    )
    got = np.asarray(jax.jit(lambda p, x: chain.apply({"params": p}, x))(params, x_BTGD))

    p64 = _to64(params)
    x = np.repeat(emb_BTD.astype(np.float64)[:, :, None, :], G, axis=2)
    pre = np.zeros((B, T, G))
    pre[..., 0] = 1.0  # the identity start: the first site reads stream 0, the embedding
    own = []
    for i in range(3):
        x_in = x
        x, pre = _site_ref(p64[f"site_{i}"], x, pre, np.tanh)
        own.append(_mix_ref(p64[f"site_{i}"], x_in, 20, EPS, 1e-6)[0])
    ref = np.einsum("btg,btgd->btd", pre, x)  # final collapse with the last site's weights
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)

    # The hand-off matters: reading with each site's OWN weights (V4's order) gives another result.
    x = np.repeat(emb_BTD.astype(np.float64)[:, :, None, :], G, axis=2)
    for i in range(3):
        x, _ = _site_ref(p64[f"site_{i}"], x, own[i], np.tanh)
    assert np.max(np.abs(np.einsum("btg,btgd->btd", own[-1], x) - ref)) > 1e-3


def test_mhc_v41_requires_the_preceding_read_weights():
    hc = HyperConnection(kind="mhc_v41", n_streams=G)
    x = jnp.ones((1, 2, G, D))
    with pytest.raises(ValueError, match="expected the preceding site's read weights"):
        hc.init(jax.random.key(0), x, method=HyperConnection.read)
    with pytest.raises(ValueError, match="use read\\(x, pre\\)"):
        hc.init(jax.random.key(0), x, lambda u: u)


# ------------------------------------------------------------------------------------------------
# The shipped deepseek_v41 config.
# ------------------------------------------------------------------------------------------------


def test_deepseek_v41_config_reproduces_the_released_tables():
    cfg = validate(load_config_file(config_path("deepseek_v41"))).model
    e = cfg.engram
    assert (e.layer_ids, e.max_ngram, e.heads_per_ngram, e.row_width) == ((1, 14), 4, 8, 256)
    assert (e.form, e.compressed_vocab_size, cfg.hc.kind, cfg.hc.sinkhorn_iters) == (
        "v41",
        99_092,
        "mhc_v41",
        20,
    )
    primes = table_primes(e.table_rows_per_head, e.heads_per_ngram, e.layer_ids)
    assert [sum(primes[layer]) for layer in (1, 14)] == [384_006_168, 384_016_682]
    acc = account(cfg, 4096)
    assert acc.engram_table_params == 196_613_849_600
    # wkv [6144, 5, 5120] + q_weight, k_weight [4, 5120] per layer.
    assert acc.engram_params - acc.engram_table_params == 2 * (6144 * 5 * 5120 + 2 * 4 * 5120)


def test_accounting_cli_reports_the_v41_table_figure():
    out = subprocess.run(
        [sys.executable, "-m", "engram_jax.accounting", "--config=deepseek_v41", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(out.stdout)["engram_table_params"] == 196_613_849_600
