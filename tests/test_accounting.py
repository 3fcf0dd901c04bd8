"""Parameter/FLOP accounting: exact against the initialised (abstract) parameter tree for small
variants, within 3% of the published sizes for the paper configs, and the JSON CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from engram_jax.accounting import account, format_accounting, to_json_dict
from engram_jax.config import validate
from tests.test_configs import abstract_params, load_config

REPO = Path(__file__).resolve().parent.parent

# (name, overrides) of tiny variants: 2-3 layers, width 32; together they cover every hc kind,
# n = 1 and n > 1, gqa (with and without QK-norm) and mla (with and without query compression),
# dense and MoE (with and without shared experts), Engram on/off, tied/untied, scan on/off.
VARIANTS = {
    "residual_gqa_dense_tied": {
        "hc.kind": "residual",
        "hc.n_streams": 1,
        "moe.num_experts": 0,
        "engram.layer_ids": (),
        "tie_embeddings": True,
    },
    "hc_mla_qlora_moe": {
        "hc.kind": "hc",
        "hc.n_streams": 2,
        "attention.kind": "mla",
        "attention.q_lora_rank": 24,
        "engram.layer_ids": (),
    },
    "mhc_gqa_qknorm_moe_engram": {
        "attention.use_qk_norm": True,
        "num_layers": 3,
        "scan_layers": True,
        "engram.layer_ids": (1,),
    },
    "mhc_lite_mla_engram_noshared": {
        "hc.kind": "mhc_lite",
        "hc.n_streams": 3,
        "attention.kind": "mla",
        "moe.num_shared_experts": 0,
        "engram.max_ngram": 4,
        "engram.table_rows_per_head": (101, 103, 107),
    },
    "mhc_n1_dense_engram_tied": {
        "hc.n_streams": 1,
        "moe.num_experts": 0,
        "tie_embeddings": True,
        "engram.layer_ids": (0, 1),
    },
    "hc_n1_scan_moe": {
        "hc.kind": "hc",
        "hc.n_streams": 1,
        "num_layers": 3,
        "scan_layers": True,
        "engram.layer_ids": (),
    },
    "mhc_lite_n1_gqa_engram": {"hc.kind": "mhc_lite", "hc.n_streams": 1},
    "mhc_v41_engram_v41_bias": {
        "hc.kind": "mhc_v41",
        "engram.form": "v41",
        "engram.wkv_bias": True,
    },
}


def small_config(overrides):
    config = load_config("tiny").get_config()
    m = config.model
    m.vocab_size = 256
    m.num_layers = 2
    m.hidden_size = 32
    m.mlp_hidden_size = 48
    m.attention.update(num_heads=4, num_kv_heads=2, head_dim=8)
    m.attention.update(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    m.moe.update(num_experts=4, top_k=2, num_shared_experts=1, expert_hidden_size=16)
    m.engram.update(layer_ids=(1,), heads_per_ngram=2, embed_per_ngram=16)
    m.engram.table_rows_per_head = (211, 223)
    m.update_from_flattened_dict(overrides)
    return validate(config).model


def leaves_by_path(params):
    """{'layer_1/engram/table': size, ...} of the abstract tree (scanned layers stacked)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        out["/".join(n for n in names if n != "value")] = math.prod(leaf.shape)
    return out


def tree_sum(sizes, predicate):
    return sum(size for path, size in sizes.items() if predicate(path.split("/")))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_counts_equal_the_initialised_tree(name):
    cfg = small_config(VARIANTS[name])
    acc = account(cfg, seq_len=16)
    sizes = leaves_by_path(abstract_params(cfg))

    total = sum(sizes.values())
    token_embedding = tree_sum(sizes, lambda p: p[0] == "embed")
    lm_head = tree_sum(sizes, lambda p: p[0] == "lm_head")
    tables = tree_sum(sizes, lambda p: "engram" in p and p[-1] == "table")
    engram = tree_sum(sizes, lambda p: "engram" in p)
    routed = tree_sum(
        sizes, lambda p: "moe" in p and "shared" not in p and p[-1] in ("w_gate", "w_up", "w_down")
    )
    e = cfg.moe
    unrouted = routed * (e.num_experts - e.top_k) // e.num_experts if e.num_experts else 0

    assert acc.total_params == total
    assert acc.token_embedding_params == token_embedding
    assert acc.lm_head_params == lm_head
    assert acc.embedding_params == token_embedding + lm_head
    assert acc.engram_params == engram
    assert acc.engram_table_params == tables
    assert acc.routed_expert_params == routed
    assert acc.total_params_excl_embeddings == total - token_embedding - lm_head
    assert acc.total_params_excl_token_embedding == total - token_embedding
    # Activated: all but the lookups (token embedding, Engram tables) and the unrouted experts;
    # the tied matrix is activated once, as the LM head.
    d_v = cfg.hidden_size * cfg.vocab_size
    assert acc.activated_params == total - token_embedding - tables - unrouted + (
        d_v if cfg.tie_embeddings else 0
    )
    assert acc.activated_params_excl_embeddings == acc.activated_params - d_v
    assert acc.sparse_params == tables + unrouted
    if tables + unrouted:
        assert acc.allocation_ratio == pytest.approx(unrouted / (tables + unrouted))
    else:
        assert acc.allocation_ratio is None
    assert sum(c.params for c in acc.breakdown) == total


def test_flops_by_hand_dense_residual_gqa():
    """6 x weight MACs + causal attention 3 * L * N * 2H * (T + 1), counted by hand."""
    cfg = small_config(VARIANTS["residual_gqa_dense_tied"])
    t = 16
    d, v, layers, f = 32, 256, 2, 48
    attention = 2 * d * 4 * 8 + 2 * d * 2 * 8  # q, out [D, N*H]; k, v [D, K*H]
    macs = layers * (attention + 3 * d * f) + d * v  # + the tied LM head
    acc = account(cfg, seq_len=t)
    assert acc.matmul_macs_per_token == macs
    assert acc.attention_flops_per_token == 3 * layers * 4 * (8 + 8) * (t + 1)
    assert acc.flops_per_token == 6 * macs + 3 * layers * 4 * 16 * (t + 1)


def test_flops_count_routed_experts_once_per_choice_and_hc_per_stream():
    base = small_config(VARIANTS["hc_mla_qlora_moe"])
    more_experts = small_config({**VARIANTS["hc_mla_qlora_moe"], "moe.num_experts": 8})
    a, b = account(base, 16), account(more_experts, 16)
    # More experts at the same top_k: only the router [D, E] adds MACs (one MoE layer).
    assert b.matmul_macs_per_token - a.matmul_macs_per_token == 32 * 4
    assert b.activated_params - a.activated_params == 32 * 4
    # HC's dynamic kernel [D, 2 + G] runs once per stream: G x its size in MACs, 2 sites a layer.
    hc = next(c for c in a.breakdown if c.name == "hyper_connections")
    assert hc.macs == 2 * 2 * 2 * 32 * (2 + 2)


def test_account_rejects_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len=0"):
        account(small_config({}), seq_len=0)


# Published sizes (docs/design.md §1.10 Engram paper Table 5; §2.8 mHC 27B), tolerance 3%.
# "total (no token emb.)" is compared with total_params_excl_token_embedding, the 3.8B activated
# with activated_params_excl_embeddings; mHC's 27.0B / 4.14B with total/activated_params.
PAPER = {
    "moe_27b": {"total_params_excl_token_embedding": 26.7e9},
    "engram_27b": {"total_params_excl_token_embedding": 26.7e9, "engram_params": 5.7e9},
    "engram_40b": {"total_params_excl_token_embedding": 39.5e9, "engram_params": 18.5e9},
    "dense_4b": {"total_params_excl_token_embedding": 4.1e9},
}
TOLERANCE = 0.03


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_match_published_sizes(name):
    config = load_config(name).get_config()
    acc = account(validate(config).model, config.seq_len)
    expected = {**PAPER[name], "activated_params_excl_embeddings": 3.8e9}
    for field, value in expected.items():
        got = getattr(acc, field)
        assert abs(got - value) <= TOLERANCE * value, f"{name}.{field}: {got:,} vs {value:,.0f}"
    if name == "moe_27b":
        assert acc.total_params == pytest.approx(27.0e9, rel=TOLERANCE)
        assert acc.activated_params == pytest.approx(4.14e9, rel=TOLERANCE)
        assert acc.allocation_ratio == 1.0
    if name == "engram_27b":
        # §1.9: the paper's allocation sits near the U-curve optimum, rho ~ 0.75-0.80.
        assert 0.7 < acc.allocation_ratio < 0.8


def test_cli_json_with_override_and_table():
    config = load_config("tiny").get_config()
    config.model.num_layers = 2
    config.model.engram.layer_ids = (1,)
    expected = to_json_dict(account(validate(config).model, config.seq_len))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engram_jax.accounting",
            "--config=configs/tiny.py",
            "--config.model.num_layers=2",
            "--config.model.engram.layer_ids=(1,)",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    for key in (
        "total_params",
        "activated_params",
        "engram_params",
        "flops_per_token",
        "total_params_excl_embeddings",
        "activated_params_excl_embeddings",
    ):
        assert got[key] == expected[key], key
    assert got == json.loads(json.dumps(expected))
    text = format_accounting(account(validate(config).model, config.seq_len))
    assert "activated excl. embeddings (P_act)" in text
    assert f"{expected['total_params']:,}" in text
