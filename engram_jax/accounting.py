"""Parameter and FLOP accounting of a `ModelConfig`, by arithmetic only (no arrays, no init).

`account(model_config, seq_len)` counts exactly the leaves of the "params" collection that
`Transformer(model_config).init` creates (the tests compare it with `jax.eval_shape`), splits them
into total / activated-per-token, and estimates training FLOPs per token.

Conventions (the paper leaves several implicit; each is a choice documented here):

- Parameters are the "params" collection only. The MoE balancing bias (`moe_bias` collection,
  updated outside the gradient) and decode caches are not parameters.
- Activated parameters are the parameters that multiply the token's activations in the forward
  pass: attention, the dense FFN, shared experts, the top-k routed experts, the router, norms,
  hyper-connection coefficients, Engram's projections / norms / convolution, and the LM head.
  Lookup tables are NOT activated (a token reads a few rows of them, like an unrouted expert it
  never touches): neither the Engram tables (docs/design.md §1.9 counts them in P_sparse) nor the
  token embedding. With tied embeddings the shared matrix counts as activated once (as the LM
  head). This reproduces mHC's "27B: 4.14B activated" (§2.8) as 3.81B + the 0.33B LM head.
- `*_excl_embeddings` removes the token embedding and the LM head (docs/design.md §1.9: P_tot and
  P_act). `total_params_excl_token_embedding` keeps the LM head: the Engram paper's Table 5 column
  "total params (no token emb.)" matches that reading to 0.1% (26.7B, 39.5B, Dense-4B 4.1B), while
  its "3.8B activated" matches `activated_params_excl_embeddings`.
- P_sparse = P_tot - P_act (both excluding embeddings) is exactly the unrouted routed-expert weights
  plus the Engram tables (and the OverEncoding / per-layer-embedding tables and the unread
  UltraMem value rows, when those are configured); the allocation ratio rho (§1.9) is the
  routed-expert share of it (None when the model has no sparse parameters).
- FLOPs per token (training, forward + backward = 3 x forward):
    `flops_per_token = 6 * matmul_macs_per_token + attention_flops_per_token`,
  where `matmul_macs_per_token` counts one multiply-add per weight entry a token passes through
  (the activated matrices and the Engram convolution taps; the HC dynamic kernel is applied once
  per stream, so it counts G times; norm gains, biases and scalars are elementwise and not
  counted; the token-embedding and Engram-table gathers cost no MACs), and
    `attention_flops_per_token = 3 * 2 * L * N * (d_qk + d_v) * (T + 1) / 2`
  counts the score (QK^T) and value (AV) products with CAUSAL masking: query i attends to i keys,
  (T + 1) / 2 on average. This is half of PaLM's `12 * L * H * Q * T` (which counts the full
  T x T square); packed documents with segment masking do even less work, which is not counted.
  The hyper-connection stream mixing (`H_res x`, `H_pre`, `H_post`, ~(n^2 + 2n) * D per site) is
  activation-by-activation work, also not counted (< 0.1% at n = 4, D = 2560).

CLI (reads a config file, never builds the model):

  python -m engram_jax.accounting --config=configs/engram_27b.py [--json]
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from engram_jax.config import HyperConfig, ModelConfig
from engram_jax.hashing import table_primes
from engram_jax.overencoding_ids import overencoding_moduli

__all__ = [
    "Accounting",
    "Component",
    "account",
    "format_accounting",
    "slice_counts",
    "to_json_dict",
]


@dataclasses.dataclass(frozen=True)
class Component:
    """One line of the breakdown: a part of the model over all layers."""

    name: str
    params: int  # Parameters in the "params" collection.
    activated: int  # Of which activated per token.
    macs: int  # Weight multiply-adds per token (forward).


@dataclasses.dataclass(frozen=True)
class Accounting:
    """Parameter counts and FLOPs of a model; see the module docstring for the conventions."""

    seq_len: int
    total_params: int
    activated_params: int
    embedding_params: int  # Token embedding + LM head, the shared matrix once when tied.
    token_embedding_params: int
    lm_head_params: int  # 0 when tied to the token embedding.
    total_params_excl_embeddings: int  # P_tot of §1.9.
    activated_params_excl_embeddings: int  # P_act of §1.9.
    total_params_excl_token_embedding: int  # Engram paper Table 5 "total params (no token emb.)".
    engram_params: int  # Tables + projections + norms + convolutions of all Engram layers.
    engram_table_params: int
    routed_expert_params: int  # All routed experts of all MoE layers (router excluded).
    activated_routed_expert_params: int  # top_k of them per MoE layer.
    sparse_params: int  # P_sparse = P_tot - P_act.
    allocation_ratio: float | None  # rho: routed-expert share of P_sparse; None without sparsity.
    matmul_macs_per_token: int
    attention_flops_per_token: int  # Training (fwd + bwd), causal.
    flops_per_token: int  # Training (fwd + bwd).
    breakdown: tuple[Component, ...]
    # MatFormer: (width fraction, total params, activated params) of the model sliced to each
    # granularity (`matformer_slice.slice_params`); () when MatFormer is off.
    matformer_slices: tuple[tuple[float, int, int], ...] = ()


# ---------------------------------------------------------------------------- per-part counts


def _attention_counts(config: ModelConfig) -> tuple[int, int, int]:
    """(params of one attention layer, per-head QK width, per-head V width); all are matmuls
    except the MLA latent norm gains and the GQA QK-norm gains."""
    a, d = config.attention, config.hidden_size
    n = a.num_heads
    if a.kind == "gqa":
        k, h = a.num_kv_heads, a.head_dim
        params = 2 * d * n * h + 2 * d * k * h + (2 * h if a.use_qk_norm else 0)
        return params, h, h
    hn, hr, hv, lkv = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
    if a.q_lora_rank:
        query = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * n * (hn + hr)
    else:
        query = d * n * (hn + hr)
    # kv_down [D, L] + kv_norm [L] + k_rope [D, Hr] + k_up [L, N, Hn] + v_up [L, N, Hv] + out.
    params = query + d * lkv + lkv + d * hr + lkv * n * hn + lkv * n * hv + n * hv * d
    return params, hn + hr, hv


def _attention_norm_params(config: ModelConfig) -> int:
    a = config.attention
    if a.kind == "gqa":
        return 2 * a.head_dim if a.use_qk_norm else 0
    return (a.q_lora_rank or 0) + a.kv_lora_rank


def _altup_layer_counts(hc: HyperConfig, d: int) -> tuple[int, int]:
    """(params, weight MACs per token) of one layer's AltUp predict / correct (docs/design.md
    "AltUp"): static K x K + K scalars; dynamic router norm [D], router [D, K] (applied twice:
    predict and correct), C_pred [K, K*K] and C_corr [K, K]."""
    k = hc.n_streams
    if hc.altup_coefficients == "static":
        return k * k + k, 0
    return d + d * k + k * k * k + k * k, 2 * d * k


def _altup_stream_counts(hc: HyperConfig, d: int) -> tuple[int, int]:
    """(params, MACs per token) of AltUp's input and output projections, [K-1, D, D] each."""
    if hc.kind != "altup":
        return 0, 0
    proj = 2 * (hc.n_streams - 1) * d * d
    return proj, proj


def _hc_site_counts(hc: HyperConfig, d: int) -> tuple[int, int]:
    """(params, weight MACs per token) of one hyper-connection site, including its pre-norm.
    AltUp's sub-layers are plain residuals (its coefficients count per layer, separately)."""
    g = hc.n_streams
    norm = d
    if hc.kind in ("residual", "altup"):
        return norm, 0
    if hc.kind == "hc":
        # static_pre [G], static_post [G], static_res [G, G], dynamic_kernel [D, 2 + G] applied to
        # each of the G streams, s_alpha, s_beta.
        kernel = d * (2 + g)
        return norm + g + g + g * g + kernel + 2, g * kernel
    # mhc_v41 has mhc's parameters (only its conventions and scheduling differ).
    num_res = math.factorial(g) if hc.kind == "mhc_lite" else (g * g if g > 1 else 0)
    # phi_pre, phi_post [G, D, G] (+ phi_res [G, D, R]), b_pre, b_post [G], alpha_pre, alpha_post
    # (+ alpha_res, b_res [R]).
    kernel = g * d * (2 * g + num_res)
    params = norm + kernel + 2 * g + 2
    if num_res:
        params += 1 + num_res
    return params, kernel


def _engram_layer_counts(config: ModelConfig, sizes: tuple[int, ...]) -> tuple[int, int, int]:
    """(table params, other params, other MACs per token) of one Engram layer (§1.4)."""
    e, d, g = config.engram, config.hidden_size, config.hc.n_streams
    w = e.row_width
    d_mem = e.num_heads * w
    multiple = e.table_row_multiple
    table = -(-sum(sizes) // multiple) * multiple * w  # rows padded up to the shardable multiple
    if e.form == "v41":
        # wkv [M*W, G + 1, D] (+ wkv_bias [G + 1, D]), q_weight and k_weight [G, D]; no conv.
        wkv = d_mem * (g + 1) * d
        return table, wkv + (g + 1) * d * e.wkv_bias + 2 * g * d, wkv
    projections = d_mem * g * d + g * d + d_mem * d + d  # key kernel/bias, value kernel/bias.
    norms = 3 * g * d  # key, query and conv RMSNorm gains [G, D].
    conv = e.conv_kernel_size * g * d  # depthwise taps [K, G, D].
    macs = d_mem * g * d + d_mem * d + conv
    return table, projections + norms + conv, macs


def _memory_variant_counts(config: ModelConfig) -> list[tuple[str, int, int, int]]:
    """`(component, params, activated, MACs)` of OverEncoding, per-layer embeddings and UltraMem
    (docs/design.md §5-7). Their tables are lookups (not activated); UltraMem's top_k value
    rows per token count as activated, like a routed expert's weights."""
    d, num_layers = config.hidden_size, config.num_layers
    out = []
    o = config.overencoding
    if o.active:
        moduli = overencoding_moduli(
            o.base_rows, o.max_ngram, o.tables_per_ngram, o.modulus_step, o.modulus_offset
        )
        w = o.width(d)
        projections = len(moduli) * w * d
        out.append(("overencoding_tables", sum(moduli) * w, 0, 0))
        out.append(("overencoding_other", projections, projections, projections))
    pl = config.ple
    if pl.enabled:
        x = num_layers * pl.width
        out.append(("ple_table", pl.rows(config.vocab_size) * x, 0, 0))
        # Projection [D, L p] and its norm gain [p]; per block: input scale [D], gate [D, p],
        # up [p, D], post-norm gain [D].
        other = d * x + pl.width + num_layers * (2 * d + 2 * d * pl.width)
        out.append(("ple_other", other, other, d * x + num_layers * 2 * d * pl.width))
    u = config.ultramem
    for _ in u.layer_ids:
        n, r, c, h = u.grid_size, u.tucker_rank, u.key_dim, u.num_cores
        read = u.top_k * u.value_width
        out.append(("ultramem_values", u.value_rows * u.value_width, read, read))
        # Norm gain [D], queries [D, 2, r, c], keys [2, r, n, c] (every key scores every token),
        # cores [h, r, r], block projectors [E, d_v, D].
        expansion = u.value_expansion * u.value_width * d
        other = d + d * 2 * r * c + 2 * r * n * c + h * r * r + expansion
        macs = d * 2 * r * c + 2 * r * n * c + h * r * r + expansion
        out.append(("ultramem_other", other, other, macs))
    return out


# ---------------------------------------------------------------------------- account


def _ffn_layer_counts(config: ModelConfig, layer: int, width: int | None) -> tuple[int, int]:
    """(params, activated params) of one layer's FFN at hidden width `width` (None: full)."""
    d, e = config.hidden_size, config.moe
    if config.is_moe_layer(layer):
        f = e.expert_hidden_size if width is None else width
        return (
            d * e.num_experts + (e.num_experts + e.num_shared_experts) * 3 * d * f,
            d * e.num_experts + (e.top_k + e.num_shared_experts) * 3 * d * f,
        )
    f = config.mlp_hidden_size if width is None else width
    return 3 * d * f, 3 * d * f


def slice_counts(
    config: ModelConfig, granularity: int | tuple[int, ...], full: Accounting | None = None
) -> tuple[int, int]:
    """(total, activated) parameters of the model MatFormer-sliced to `granularity` (one index
    or one per layer): the full counts with every FFN at its nested width."""
    m = config.matformer
    picks = (granularity,) * config.num_layers if isinstance(granularity, int) else granularity
    full = full or account(config, 1)
    total, activated = full.total_params, full.activated_params
    for layer, index in enumerate(picks):
        f = config.moe.expert_hidden_size if config.is_moe_layer(layer) else config.mlp_hidden_size
        sliced = _ffn_layer_counts(config, layer, m.widths(f)[index])
        whole = _ffn_layer_counts(config, layer, None)
        total += sliced[0] - whole[0]
        activated += sliced[1] - whole[1]
    return total, activated


def _component_counts(cfg: ModelConfig) -> dict[str, list[int]]:
    """`{component: [params, activated params, matmul MACs per token]}`, in model order."""
    d, v = cfg.hidden_size, cfg.vocab_size
    parts: dict[str, list[int]] = {}

    def add(name: str, params: int, activated: int, macs: int) -> None:
        entry = parts.setdefault(name, [0, 0, 0])
        entry[0] += params
        entry[1] += activated
        entry[2] += macs

    # Embeddings: the lookup is free and sparse; the LM head is a dense [D, V] matmul.
    add("token_embedding", v * d, 0, 0)
    if cfg.tie_embeddings:
        add("lm_head (tied)", 0, v * d, v * d)
    else:
        add("lm_head", d * v, d * v, d * v)

    attn_params, _, _ = _attention_counts(cfg)
    attn_macs = attn_params - _attention_norm_params(cfg)
    hc_params, hc_macs = _hc_site_counts(cfg.hc, d)
    e = cfg.moe
    # The same prime search as `model.engram_table_sizes` (kept here so this module stays free of
    # jax; the tests compare the resulting counts with the initialised tree).
    sizes = (
        table_primes(
            cfg.engram.table_rows_per_head, cfg.engram.heads_per_ngram, cfg.engram.layer_ids
        )
        if cfg.engram.enabled
        else {}
    )
    streams, stream_macs = _altup_stream_counts(cfg.hc, d)
    if streams:
        add("altup_streams", streams, streams, stream_macs)
    for layer in range(cfg.num_layers):
        add("attention", attn_params, attn_params, attn_macs)
        add("hyper_connections", 2 * hc_params, 2 * hc_params, 2 * hc_macs)
        if cfg.hc.kind == "altup":
            altup, altup_macs = _altup_layer_counts(cfg.hc, d)
            add("altup", altup, altup, altup_macs)
        if cfg.is_moe_layer(layer):
            f = e.expert_hidden_size
            expert = 3 * d * f
            add("moe_router", d * e.num_experts, d * e.num_experts, d * e.num_experts)
            shared = e.num_shared_experts * expert
            add("moe_shared_experts", shared, shared, shared)
            add("moe_routed_experts", e.num_experts * expert, e.top_k * expert, e.top_k * expert)
        else:
            mlp = 3 * d * cfg.mlp_hidden_size
            add("dense_ffn", mlp, mlp, mlp)
        if layer in sizes:
            table, other, macs = _engram_layer_counts(cfg, sizes[layer])
            add("engram_tables", table, 0, 0)
            add("engram_other", other, other, macs)
    for name, params, activated, macs in _memory_variant_counts(cfg):
        add(name, params, activated, macs)
    add("final_norm", d, d, 0)
    return parts


def account(model_config: ModelConfig, seq_len: int) -> Accounting:
    """Counts parameters and training FLOPs of `Transformer(model_config)` at `seq_len` tokens.

    Pure arithmetic (plus the host-side prime search of the Engram table sizes).

    Args:
      model_config: the validated model config.
      seq_len: T, the training sequence length (enters the attention FLOPs only).

    Raises:
      ValueError: seq_len < 1.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"account: seq_len={seq_len!r}; expected an integer >= 1")
    cfg = model_config
    d, v, num_layers = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    parts = _component_counts(cfg)
    _, d_qk, d_v = _attention_counts(cfg)

    def get(name: str, field: int) -> int:
        return parts.get(name, [0, 0, 0])[field]

    total = sum(p[0] for p in parts.values())
    activated = sum(p[1] for p in parts.values())
    macs = sum(p[2] for p in parts.values())
    token_embedding = v * d
    lm_head = 0 if cfg.tie_embeddings else d * v
    embedding = token_embedding + lm_head
    total_excl = total - embedding
    # The LM head (or the tied matrix in its LM-head role) is the only activated embedding part.
    activated_excl = activated - d * v
    sparse = total_excl - activated_excl
    routed = get("moe_routed_experts", 0)
    routed_activated = get("moe_routed_experts", 1)
    rho = (routed - routed_activated) / sparse if sparse > 0 else None

    attention_flops = 3 * num_layers * cfg.attention.num_heads * (d_qk + d_v) * (seq_len + 1)
    result = Accounting(
        seq_len=seq_len,
        total_params=total,
        activated_params=activated,
        embedding_params=embedding,
        token_embedding_params=token_embedding,
        lm_head_params=lm_head,
        total_params_excl_embeddings=total_excl,
        activated_params_excl_embeddings=activated_excl,
        total_params_excl_token_embedding=total - token_embedding,
        engram_params=get("engram_tables", 0) + get("engram_other", 0),
        engram_table_params=get("engram_tables", 0),
        routed_expert_params=routed,
        activated_routed_expert_params=routed_activated,
        sparse_params=sparse,
        allocation_ratio=rho,
        matmul_macs_per_token=macs,
        attention_flops_per_token=attention_flops,
        flops_per_token=6 * macs + attention_flops,
        breakdown=tuple(Component(name, *counts) for name, counts in parts.items()),
    )
    if not cfg.matformer.enabled:
        return result
    slices = tuple(
        (float(r), *slice_counts(cfg, i, result)) for i, r in enumerate(cfg.matformer.granularities)
    )
    return dataclasses.replace(result, matformer_slices=slices)


# ---------------------------------------------------------------------------- reporting


def to_json_dict(acc: Accounting) -> dict[str, Any]:
    """A JSON-friendly dict of every field; `breakdown` maps each component to its counts."""
    out = {f.name: getattr(acc, f.name) for f in dataclasses.fields(acc) if f.name != "breakdown"}
    out["breakdown"] = {
        c.name: {"params": c.params, "activated": c.activated, "macs": c.macs}
        for c in acc.breakdown
    }
    return out


def _billions(n: int | float) -> str:
    return f"{n / 1e9:.3f}B" if abs(n) >= 1e8 else f"{n / 1e6:.3f}M"


def format_accounting(acc: Accounting) -> str:
    """A readable multi-line summary (component table, then totals), for logs and the CLI."""
    lines = [f"{'component':<22}{'params':>16}{'activated':>16}{'MACs/token':>16}"]
    for c in acc.breakdown:
        lines.append(f"{c.name:<22}{c.params:>16,}{c.activated:>16,}{c.macs:>16,}")
    rho = "n/a" if acc.allocation_ratio is None else f"{acc.allocation_ratio:.4f}"
    rows = [
        ("total params", acc.total_params),
        ("activated params", acc.activated_params),
        ("total excl. embeddings (P_tot)", acc.total_params_excl_embeddings),
        ("activated excl. embeddings (P_act)", acc.activated_params_excl_embeddings),
        ("total excl. token embedding", acc.total_params_excl_token_embedding),
        ("embedding params", acc.embedding_params),
        ("engram params", acc.engram_params),
        ("engram table params", acc.engram_table_params),
        ("sparse params (P_sparse)", acc.sparse_params),
    ]
    lines.append("")
    for label, value in rows:
        lines.append(f"{label:<38}{value:>18,}  ({_billions(value)})")
    lines.append(f"{'allocation ratio rho (routed share)':<38}{rho:>18}")
    for ratio, total, activated in acc.matformer_slices:
        label = f"MatFormer slice {ratio:g} x FFN width"
        lines.append(f"{label:<38}{total:>18,}  ({_billions(total)}; activated {activated:,})")
    lines.append(
        f"{'train FLOPs/token (T=' + str(acc.seq_len) + ')':<38}{acc.flops_per_token:>18,}"
        f"  ({acc.flops_per_token / 1e9:.2f} GFLOP; attention "
        f"{acc.attention_flops_per_token / 1e9:.2f})"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI


def _cli() -> None:  # pragma: no cover - exercised through a subprocess test
    """Defines the flags only when run as a program (the trainer imports this module and owns its
    own --config flag)."""
    from absl import app, flags
    from ml_collections import config_flags

    from engram_jax.config import validate

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Config file, or the name of a shipped config (tiny).", lock_config=True
    )
    json_flag = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
    flags.mark_flag_as_required("config")

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        config = validate(config_flag.value)
        acc = account(config.model, config.train.seq_len)
        text = json.dumps(to_json_dict(acc), indent=2) if json_flag.value else None
        print(text or format_accounting(acc))

    from engram_jax import cli

    cli.run(main, config_flag="config")  # --config=tiny: a shipped config by name


if __name__ == "__main__":  # pragma: no cover
    _cli()
