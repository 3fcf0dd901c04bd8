"""The decoder-only language model: token embedding -> hyper-connection streams -> blocks ->
merge -> final RMSNorm -> LM head, every choice taken from one `ModelConfig`.

Block `l` (docs/design.md §1.7, §2.1): optional Engram (added to every stream, not wrapped by the
hyper-connection), then attention and the FFN (dense SwiGLU for the first `num_dense_layers`, MoE
after), each wrapped by the configured hyper-connection kind, which owns the sub-layer's pre-norm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import axes, input_checks
from engram_jax.altup import AltUp, AltUpStreams
from engram_jax.attention import Attention, MultiHeadLatentAttention
from engram_jax.config import ModelConfig
from engram_jax.engram import Engram

# The layer plan is read from the config alone; it stays importable from here.
from engram_jax.layer_plan import (  # noqa: F401
    Run,
    engram_table_sizes,
    first_engram_layer,
    layer_runs,
    overencoding_table_sizes,
    run_granularity,
)
from engram_jax.layers import RMSNorm
from engram_jax.mhc import (
    HyperConnection,
    collapse_streams,
    expand_streams,
    initial_pre,
    merge_streams,
)
from engram_jax.moe import MLP, MoE
from engram_jax.overencoding import OverEncoding
from engram_jax.ple import PerLayerInputs, PleInjection
from engram_jax.ultramem import UltraMem

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Variable collections a training step must thread through `apply`.
MOE_BIAS = "moe_bias"


def _next_pre(pre_BTG: jax.Array | None, mixing: Any) -> jax.Array | None:
    """hc.kind "mhc_v41": the read weights this site produced for the next one (docs/design.md
    §14.2); other kinds carry none."""
    return None if pre_BTG is None else mixing.h_pre


def _coeff_init(std: float) -> nn.initializers.Initializer:
    """N(0, std) for the mixing coefficients' projections; zeros when std is 0."""
    return nn.initializers.normal(std) if std > 0 else nn.initializers.zeros_init()


def _dtypes(cfg: ModelConfig) -> dict[str, Any]:
    """The compute and parameter dtypes every submodule takes."""
    return dict(dtype=_DTYPES[cfg.dtype], param_dtype=_DTYPES[cfg.param_dtype])


class Block(nn.Module):
    """One decoder block: [Engram] -> hyper-connected attention -> hyper-connected FFN.

    Returns `(x_BTGD, stats)`; with hc.kind "mhc_v41" the streams travel with the read weights of
    the next site, `x = (x_BTGD, pre_BTG)`, in and out. `stats` holds the MoE statistics
    (`load [E]`, `balance_loss`) and Engram gates (`engram_gates [B, T, G]`) of this block, as
    present.
    """

    config: ModelConfig
    layer: int
    use_moe: bool
    engram_sizes: tuple[int, ...] | None = None
    decode: bool = False
    lookup_fn: Callable | None = None
    sow_mixing: bool = False
    # MatFormer: the FFN's granularity (None: full width; an int, or a traced index in training).
    ffn_granularity: Any = None
    has_ultramem: bool = False

    def _hyper(self, site: int, name: str) -> HyperConnection:
        hc = self.config.hc
        # AltUp: the sub-layers are plain residuals on the active block (see `_altup`).
        altup = hc.kind == "altup"
        return HyperConnection(
            kind="residual" if altup else hc.kind,
            n_streams=1 if altup else hc.n_streams,
            layer_index=site,
            sinkhorn_iters=hc.sinkhorn_iters,
            sinkhorn_eps=hc.sinkhorn_eps,
            sinkhorn_order=hc.sinkhorn_order,
            alpha_init=hc.alpha_init,
            res_offdiag_bias=hc.res_offdiag_bias,
            lite_other_bias=hc.lite_offperm_bias,
            coeff_kernel_init=_coeff_init(hc.coeff_init_std),
            **self._mixing_common(),
            name=name,
        )

    def _mixing_common(self) -> dict[str, Any]:
        """The settings the residual-stream modules (hyper-connections, AltUp) share."""
        return dict(
            norm_eps=self.config.norm_eps, sow_mixing=self.sow_mixing, **_dtypes(self.config)
        )

    def _altup(self) -> AltUp | None:
        """AltUp's predict / correct around the whole layer (None for the other kinds)."""
        hc = self.config.hc
        if hc.kind != "altup":
            return None
        return AltUp(
            num_blocks=hc.n_streams,
            hidden_size=self.config.hidden_size,
            layer=self.layer,
            active=hc.altup_active_block,
            coefficients=hc.altup_coefficients,
            coef_clip=hc.altup_coef_clip,
            router_init=_coeff_init(hc.coeff_init_std),
            **self._mixing_common(),
            name="altup",
        )

    def _attention(self) -> nn.Module:
        cfg = self.config
        a = cfg.attention
        common = dict(
            rope_theta=a.rope_theta,
            **_dtypes(cfg),
            decode=self.decode,
            name="attention",
        )
        if a.kind == "mla":
            return MultiHeadLatentAttention(
                num_heads=a.num_heads,
                q_lora_rank=a.q_lora_rank or None,
                kv_lora_rank=a.kv_lora_rank,
                qk_nope_head_dim=a.qk_nope_head_dim,
                qk_rope_head_dim=a.qk_rope_head_dim,
                v_head_dim=a.v_head_dim,
                norm_eps=cfg.norm_eps,
                **common,
            )
        return Attention(
            num_heads=a.num_heads,
            num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            use_qk_norm=a.use_qk_norm,
            qk_norm_eps=cfg.norm_eps,
            **common,
        )

    def _engram(self) -> Engram:
        cfg = self.config
        e = cfg.engram
        return Engram(
            head_vocab_sizes=self.engram_sizes,
            max_ngram=e.max_ngram,
            row_width=e.row_width,
            conv_kernel_size=e.conv_kernel_size,
            conv_dilation=e.dilation,
            qk_norm_eps=e.qk_norm_eps,
            conv_norm_eps=e.conv_norm_eps,
            gate_clamp=e.gate_clamp,
            conv_zero_init=e.conv_zero_init,
            table_init=nn.initializers.normal(e.table_init_std),
            **_dtypes(cfg),
            table_dtype=_DTYPES[e.table_dtype],
            table_row_multiple=e.table_row_multiple,
            lookup_fn=self.lookup_fn,
            decode=self.decode,
            form=e.form,
            wkv_bias=e.wkv_bias,
            heads_per_ngram=e.heads_per_ngram,
            name="engram",
        )

    def _ultramem(self) -> UltraMem:
        u, cfg = self.config.ultramem, self.config
        return UltraMem(
            grid_size=u.grid_size,
            key_dim=u.key_dim,
            tucker_rank=u.tucker_rank,
            num_cores=u.num_cores,
            top_k=u.top_k,
            candidates=u.candidates,
            value_expansion=u.value_expansion,
            value_width=u.value_width,
            norm_eps=cfg.norm_eps,
            **_dtypes(cfg),
            name="ultramem",
        )

    def _ffn(self) -> nn.Module:
        cfg = self.config
        dtype, param_dtype = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
        nested = cfg.matformer.enabled
        if not self.use_moe:
            return MLP(
                cfg.mlp_hidden_size,
                dtype=dtype,
                param_dtype=param_dtype,
                nested_widths=cfg.matformer.widths(cfg.mlp_hidden_size) if nested else (),
                granularity=self.ffn_granularity,
                name="mlp",
            )
        e = cfg.moe
        # Decoding routes a handful of tokens per call. The dropless dispatches need nothing; for
        # "capacity", E/K slots per token never drop one (the full forward may still drop).
        capacity = max(e.capacity_factor, e.num_experts / e.top_k) if self.decode else None
        return MoE(
            num_experts=e.num_experts,
            top_k=e.top_k,
            expert_hidden_size=e.expert_hidden_size,
            num_shared_experts=e.num_shared_experts,
            routed_scaling_factor=e.routed_scaling_factor,
            seq_balance_weight=e.seq_balance_weight,
            bias_update_rate=0.0 if self.decode else e.bias_update_rate,
            dispatch=e.dispatch,
            capacity_factor=capacity or e.capacity_factor,
            block_size=e.block_size,
            dtype=dtype,
            param_dtype=param_dtype,
            nested_widths=cfg.matformer.widths(e.expert_hidden_size) if nested else (),
            granularity=self.ffn_granularity,
            name="moe",
        )

    @nn.compact
    def __call__(
        self,
        x_BTGD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None,
        hash_ids_BTM: jax.Array | None,
        engram_rows_BTMW: jax.Array | None = None,
        token_mask_BT: jax.Array | None = None,
        ple_BTP: jax.Array | None = None,
        ultramem_rows: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.config
        stats: dict[str, jax.Array] = {}
        segments = None if self.decode else segment_ids_BT
        # hc.kind "mhc_v41" carries (streams, read weights of the next site) from block to block.
        x_BTGD, pre_BTG = x_BTGD if isinstance(x_BTGD, tuple) else (x_BTGD, None)
        if self.engram_sizes is not None:
            memory_BTGD, gates_BTG = self._engram()(
                x_BTGD,
                hash_ids_BTM,
                rows=engram_rows_BTMW,
                segment_ids=segments,
                return_gates=True,
            )
            # §1.7: Engram reads every stream directly and its output joins each stream.
            x_BTGD = x_BTGD + memory_BTGD.astype(x_BTGD.dtype)
            stats["engram_gates"] = gates_BTG
        if self.has_ultramem:
            # Like Engram's output, the memory read joins every stream (docs/design.md §6).
            # `ultramem_rows` ({"values", "delta"}): the sparse step's table and zero delta.
            rows = ultramem_rows or {}
            memory_BTD, slots_BTK = self._ultramem()(
                x_BTGD, True, rows.get("values"), rows.get("delta")
            )
            x_BTGD = x_BTGD + memory_BTD[:, :, None].astype(x_BTGD.dtype)
            stats["ultramem_slots"] = slots_BTK

        altup = self._altup()
        if altup is not None:
            # [B, T, K, D] predicted blocks; the layer runs on the active one as a single stream.
            x_hat_BTKD, x_BTGD = altup.predict(x_BTGD)
        attn_hc = self._hyper(2 * self.layer, "attention_hc")
        h_BTD, mixing = attn_hc.read(x_BTGD, pre_BTG)
        y_BTD = self._attention()(h_BTD, positions_BT, segments)
        x_BTGD = attn_hc.write(x_BTGD, y_BTD, mixing)
        pre_BTG = _next_pre(pre_BTG, mixing)

        ffn_hc = self._hyper(2 * self.layer + 1, "ffn_hc")
        h_BTD, mixing = ffn_hc.read(x_BTGD, pre_BTG)
        if self.use_moe:
            y_BTD, moe_stats = self._ffn()(h_BTD, token_mask_BT)
            stats["moe_load"] = moe_stats["load"]
            stats["moe_balance_loss"] = moe_stats["balance_loss"]
        else:
            y_BTD = self._ffn()(h_BTD)
        x_BTGD = ffn_hc.write(x_BTGD, y_BTD, mixing)
        pre_BTG = _next_pre(pre_BTG, mixing)
        if altup is not None:
            x_BTGD = altup.correct(x_hat_BTKD, x_BTGD[:, :, 0])
        if ple_BTP is not None:
            # §7.1: the block's output (the streams' mean) gates the layer's vector; the update
            # joins every stream, as no stream of our residual kinds is inactive.
            u_BTD = PleInjection(
                width=cfg.ple.width,
                norm_eps=cfg.norm_eps,
                **_dtypes(cfg),
                name="ple",
            )(jnp.mean(x_BTGD, axis=2), ple_BTP)
            x_BTGD = x_BTGD + u_BTD[:, :, None].astype(x_BTGD.dtype)
        x_BTGD = nn.with_logical_constraint(
            x_BTGD, (axes.BATCH, axes.LENGTH, axes.ACT_STREAMS, axes.ACT_EMBED)
        )
        return (x_BTGD if pre_BTG is None else (x_BTGD, pre_BTG)), stats


class Transformer(nn.Module):
    """Decoder-only LM built from a `ModelConfig`.

    `__call__(tokens [B, T], positions [B, T] | None, segment_ids [B, T] | None,
    hash_ids [B, L_e, T, M] | None, token_mask [B, T] | None) -> (logits [B, T, V] float32, aux)`.
    `token_mask` (the training batch's loss mask: 0 on padding) keeps padding out of the MoE
    routing statistics: load, balance loss and bias update (see `MoE.__call__`).
    `hash_ids[:, i]` are the hash ids of the i-th Engram layer in `config.engram.layer_ids` order,
    computed on the host (`NgramHasher` on compressed tokens). `aux` holds
    `moe_balance_loss` (summed over MoE layers), `moe_load [L_moe, E]` and
    `engram_gates [L_e, B, T, G]` when those parts exist. With `engram_rows [B, L_e, T, M, W]`
    instead of `hash_ids`, the Engram layers read those already-gathered table rows and own no
    `table` parameter (sparse table training, and tables kept on the host or on disk).

    Decoding (`decode=True`): initialise with a full-length input to create the `cache`
    collection (attention KV / MLA latent caches and Engram convolution states), then call with
    `mutable=["cache"]` on chunks with explicit positions (see `attention.py`'s protocol).

    `layer_range=(start, stop)` runs only layers `[start, stop)` (both on `layer_runs`
    boundaries; an Engram layer always is one) from `hidden [B, T, G, D]`, the streams an earlier
    range returned (`(0, 0)` returns the embedded tokens), or from the token embedding when
    `hidden` is None, which needs `start == 0`; when `stop < num_layers`
    the result is `(hidden [B, T, G, D], aux)` instead of logits. Ranges that contain no Engram
    layer need neither `hash_ids` nor `engram_rows`. `generate` splits a decode step at the first
    Engram layer this way, so the layers before it run while the host reads the table rows.

    With hc.kind "mhc_v41" the streams travel with the read weights of the next hyper-connection
    site (docs/design.md §14.2): `hidden` and the streams a partial range returns are the pair
    `(streams [B, T, G, D], pre [B, T, G])`, the first site reads with `mhc.initial_pre`, and the
    last site's `pre` collapses the streams before the final norm (instead of their sum).

    Memory variants (docs/design.md §5-7): `overencoding_ids [B, T, K]` are OverEncoding's host
    ids (computed on the device when None). `memory_rows` replaces tables by rows the sparse step
    gathered: `"overencoding"` `[B, T, K, W]`, `"ple"` `[B, T, L*p]`, and per UltraMem run
    `"ultramem/<run name>"` `{"values": [P, d_v] (read outside the gradient), "delta": [B, T, k,
    d_v] (zeros)}`; `aux["ultramem_slots"] [L_u, B, T, k]` are the value slots each UltraMem layer
    read.

    With `sow_mixing=True` every hyper-connection sows its mixing matrices into "intermediates";
    `mixing_matrices` orders them by depth for the mHC diagnostics.

    `hc.kind="altup"`: the G = K streams are AltUp blocks (`altup.py`); each block predicts /
    corrects them around its layer, which runs as a plain residual on the active block.
    MatFormer (`config.matformer`): `ffn_granularity` (a traced int32 index, the training step's
    draw) runs every FFN at that nested width; None takes `matformer.inference_granularity`.
    Token ids must lie in `[0, vocab_size)`. Concrete ids outside raise ValueError; under `jit`
    such an id (negative ones too) makes the logits of its whole sequence NaN, or a checkify
    error with debug checks on (`engram_jax.input_checks`).
    """

    config: ModelConfig
    decode: bool = False
    lookup_fn: Callable | None = None
    sow_mixing: bool = False

    def _overencoding(self) -> OverEncoding:
        cfg = self.config
        o = cfg.overencoding
        return OverEncoding(
            vocab_size=cfg.vocab_size,
            max_ngram=o.max_ngram,
            tables_per_ngram=o.tables_per_ngram,
            moduli=overencoding_table_sizes(cfg),
            row_width=o.width(cfg.hidden_size),
            average=o.combine == "mean",
            table_init=nn.initializers.normal(cfg.engram.table_init_std),
            **_dtypes(cfg),
            decode=self.decode,
            name="overencoding",
        )

    def _check_range(self, layer_range, hidden_BTGD, tokens_BT) -> tuple[int, int]:
        """`layer_range` as `(start, stop)` (None: all layers), checked against the runs."""
        cfg = self.config
        if layer_range is None:
            layer_range = (0, cfg.num_layers)
        start, stop = (int(i) for i in layer_range)
        starts = {run.start for run in layer_runs(cfg)} | {cfg.num_layers}
        if not 0 <= start <= stop <= cfg.num_layers or start not in starts or stop not in starts:
            raise ValueError(
                f"Transformer: layer_range={tuple(layer_range)}; expected (start, stop) with "
                f"0 <= start <= stop <= {cfg.num_layers}, both run boundaries {sorted(starts)}"
            )
        if hidden_BTGD is None and start > 0:
            raise ValueError(
                f"Transformer: hidden is None with layer_range start {start}; expected the "
                "hidden streams [B, T, G, D] of layers [0, start) (only start 0 embeds tokens)"
            )
        if hidden_BTGD is not None:
            b, t = tokens_BT.shape
            expected = (b, t, cfg.hc.n_streams, cfg.hidden_size)
            if (cfg.hc.kind == "mhc_v41") != isinstance(hidden_BTGD, tuple):
                raise ValueError(
                    "Transformer: hidden must be the (streams, pre) pair a layer range returned "
                    f"exactly when hc.kind='mhc_v41' (kind {cfg.hc.kind!r})"
                )
            if isinstance(hidden_BTGD, tuple):
                hidden_BTGD = hidden_BTGD[0]
            if tuple(hidden_BTGD.shape) != expected:
                raise ValueError(
                    f"Transformer: hidden has shape {tuple(hidden_BTGD.shape)}; expected "
                    f"[B, T, G, D] = {expected}"
                )
        return start, stop

    def _check_inputs(
        self, tokens_BT, positions_BT, segment_ids_BT, hash_ids, rows, needs_engram=True
    ) -> None:
        cfg = self.config
        if tokens_BT.ndim != 2:
            raise ValueError(f"Transformer: tokens has shape {tokens_BT.shape}; expected [B, T]")
        if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
            raise TypeError(f"Transformer: tokens has dtype {tokens_BT.dtype}; expected integers")
        for name, value in (("positions", positions_BT), ("segment_ids", segment_ids_BT)):
            if value is not None and value.shape != tokens_BT.shape:
                raise ValueError(
                    f"Transformer: {name} has shape {value.shape}; expected {tokens_BT.shape} "
                    "(the tokens' [B, T])"
                )
        if self.decode and segment_ids_BT is not None:
            raise ValueError(
                "Transformer: segment_ids must be None with decode=True (one sequence per batch "
                "row; the decode cache cannot separate packed documents)"
            )
        e = cfg.engram
        if rows is not None:
            b, t = tokens_BT.shape
            expected = (b, len(e.layer_ids), t, e.num_heads, e.row_width)
            if not e.enabled or hash_ids is not None or tuple(rows.shape) != expected:
                raise ValueError(
                    f"Transformer: engram_rows has shape {tuple(rows.shape)} (hash_ids "
                    f"{'given' if hash_ids is not None else 'None'}); expected [B, L_e, T, M, W] = "
                    f"{expected} with Engram enabled and hash_ids None"
                )
        elif e.enabled and (needs_engram or hash_ids is not None):
            b, t = tokens_BT.shape
            expected = (b, len(e.layer_ids), t, e.num_heads)
            if hash_ids is None or tuple(hash_ids.shape) != expected:
                got = None if hash_ids is None else tuple(hash_ids.shape)
                raise ValueError(
                    f"Transformer: hash_ids has shape {got}; expected [B, L_e, T, M] = {expected} "
                    f"(Engram layers {tuple(e.layer_ids)}, M = (max_ngram-1) x heads_per_ngram)"
                )
        elif hash_ids is not None:
            raise ValueError("Transformer: hash_ids given but config.engram.layer_ids is empty")

    @nn.compact
    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        hash_ids: jax.Array | None = None,
        engram_rows: jax.Array | None = None,
        token_mask_BT: jax.Array | None = None,
        *,
        hidden_BTGD: jax.Array | None = None,
        layer_range: tuple[int, int] | None = None,
        ffn_granularity: jax.Array | None = None,
        overencoding_ids: jax.Array | None = None,
        memory_rows: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        cfg = self.config
        start, stop = self._check_range(layer_range, hidden_BTGD, tokens_BT)
        runs = [run for run in layer_runs(cfg) if start <= run.start < stop]
        needs_engram = any(run.has_engram for run in runs)
        self._check_inputs(
            tokens_BT, positions_BT, segment_ids_BT, hash_ids, engram_rows, needs_engram
        )
        input_checks.check_in_range(tokens_BT, 0, cfg.vocab_size, "Transformer: tokens")
        if token_mask_BT is not None and tuple(token_mask_BT.shape) != tokens_BT.shape:
            raise ValueError(
                f"Transformer: token_mask has shape {tuple(token_mask_BT.shape)}; expected "
                f"{tokens_BT.shape} (the tokens' [B, T])"
            )
        b, t = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
        memory_rows = memory_rows or {}
        embed, altup_streams = self._embedders()
        if hidden_BTGD is None:
            hidden_BTGD = self._embed_tokens(
                embed, altup_streams, tokens_BT, segment_ids_BT, overencoding_ids, memory_rows
            )
        ple_LBTP = self._per_layer_inputs(embed, tokens_BT, memory_rows)
        x_BTGD, stats_per_run = self._run_blocks(
            runs,
            hidden_BTGD,
            positions_BT=positions_BT,
            segment_ids_BT=segment_ids_BT,
            hash_ids=hash_ids,
            engram_rows=engram_rows,
            token_mask_BT=token_mask_BT,
            ple_LBTP=ple_LBTP,
            ffn_granularity=ffn_granularity,
            memory_rows=memory_rows,
        )
        if stop < cfg.num_layers:
            return x_BTGD, _collect_stats(stats_per_run)
        return self._head(embed, altup_streams, x_BTGD), _collect_stats(stats_per_run)

    def _embedders(self) -> tuple[nn.Embed, AltUpStreams | None]:
        """The token embedding (also the tied head and PLE's input) and, for AltUp, the module
        that widens it into the K blocks and merges them back."""
        cfg = self.config
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
                (axes.VOCAB, axes.EMBED),
            ),
            **_dtypes(cfg),
            name="embed",
        )
        altup_streams = None
        if cfg.hc.kind == "altup":
            altup_streams = AltUpStreams(
                cfg.hc.n_streams,
                cfg.hidden_size,
                **_dtypes(cfg),
                name="altup_streams",
            )
        return embed, altup_streams

    def _embed_tokens(
        self, embed, altup_streams, tokens_BT, segment_ids_BT, overencoding_ids, memory_rows
    ):
        """[B, T, G, D]: the embedded tokens (plus OverEncoding's n-gram embeddings) expanded
        into the residual streams; mhc_v41 also carries the first site's read weights."""
        cfg = self.config
        b, t = tokens_BT.shape
        embedded_BTD = embed(_outside_vocab_to_nan(tokens_BT, cfg))
        if cfg.overencoding.active:
            embedded_BTD = self._overencoding()(
                embedded_BTD,
                tokens_BT,
                segment_ids_BT,
                overencoding_ids,
                memory_rows.get("overencoding"),
            )
        if altup_streams is not None:
            hidden_BTGD = altup_streams.expand(embedded_BTD)
        else:
            hidden_BTGD = expand_streams(embedded_BTD, cfg.hc.n_streams)
        if cfg.hc.kind == "mhc_v41":
            # The identity start: the first site reads the embedding (mhc.initial_pre).
            hidden_BTGD = (hidden_BTGD, initial_pre(b, t, cfg.hc.n_streams))
        return hidden_BTGD

    def _per_layer_inputs(self, embed, tokens_BT, memory_rows) -> jax.Array | None:
        """[L, B, T, p]: PLE's vector for every layer, or None when PLE is off."""
        cfg = self.config
        if not cfg.ple.enabled:
            return None
        ple_BTLP = PerLayerInputs(
            num_layers=cfg.num_layers,
            width=cfg.ple.width,
            table_rows=cfg.ple.rows(cfg.vocab_size),
            norm_eps=cfg.norm_eps,
            table_init=nn.initializers.normal(cfg.engram.table_init_std),
            **_dtypes(cfg),
            name="ple",
        )(embed(tokens_BT), tokens_BT, memory_rows.get("ple"))
        return jnp.moveaxis(ple_BTLP, 2, 0)  # [B, T, L, p] -> [L, B, T, p]

    def _run_blocks(
        self,
        runs,
        x_BTGD,
        *,
        positions_BT,
        segment_ids_BT,
        hash_ids,
        engram_rows,
        token_mask_BT,
        ple_LBTP,
        ffn_granularity,
        memory_rows,
    ):
        """The blocks of `runs`: a run of one layer as one Block, a longer run as one nn.scan.
        Returns the streams after the last run and each run's stacked statistics."""
        cfg = self.config
        sizes = engram_table_sizes(cfg)
        engram_index = {layer: i for i, layer in enumerate(cfg.engram.layer_ids)}
        stats_per_run: list[tuple[Run, dict[str, jax.Array]]] = []
        for run in runs:
            granularity = ffn_granularity
            if granularity is None:
                granularity = run_granularity(cfg, run)
            block_kwargs = dict(
                ffn_granularity=granularity,
                config=cfg,
                layer=run.start,
                use_moe=run.use_moe,
                decode=self.decode,
                lookup_fn=self.lookup_fn,
                sow_mixing=self.sow_mixing,
                has_ultramem=run.has_ultramem,
            )
            ple_run = None if ple_LBTP is None else ple_LBTP[run.start : run.stop]  # [L_run,B,T,p]
            block_cls = nn.remat(Block, static_argnums=()) if cfg.remat else Block
            if run.stop - run.start == 1:
                hash_ids_BTM = rows_BTMW = None
                if run.has_engram:
                    block_kwargs["engram_sizes"] = sizes[run.start]
                    if engram_rows is not None:
                        rows_BTMW = engram_rows[:, engram_index[run.start]]  # [B, T, M, W]
                    else:
                        hash_ids_BTM = hash_ids[:, engram_index[run.start]]  # [B, T, M]
                x_BTGD, stats = block_cls(**block_kwargs, name=run.name)(
                    x_BTGD,
                    positions_BT,
                    segment_ids_BT,
                    hash_ids_BTM,
                    rows_BTMW,
                    token_mask_BT,
                    None if ple_run is None else ple_run[0],
                    memory_rows.get(f"ultramem/{run.name}"),
                )
                stats = {k: v[None] for k, v in stats.items()}  # [1, ...] like a scan
            else:
                scanned = nn.scan(
                    block_cls,
                    variable_axes={"params": 0, "cache": 0, MOE_BIAS: 0, "intermediates": 0},
                    split_rngs={"params": True},
                    # positions, segment ids, hash ids (None), engram rows (None), token mask;
                    # the per-layer PLE inputs are scanned over their layer axis.
                    in_axes=(nn.broadcast,) * 5 + (0,),
                    length=run.stop - run.start,
                    metadata_params={nn.PARTITION_NAME: axes.LAYERS},
                )
                x_BTGD, stats = scanned(**block_kwargs, name=run.name)(
                    x_BTGD, positions_BT, segment_ids_BT, None, None, token_mask_BT, ple_run
                )
            stats_per_run.append((run, stats))
        return x_BTGD, stats_per_run

    def _head(self, embed, altup_streams, x_BTGD) -> jax.Array:
        """[B, T, V] float32 logits from the last layer's streams."""
        cfg = self.config
        dtype = _DTYPES[cfg.dtype]
        param_dtype = _DTYPES[cfg.param_dtype]
        # mhc_v41: the last site's read weights collapse the streams (no separate head mix).
        if isinstance(x_BTGD, tuple):
            x_BTD = collapse_streams(*x_BTGD)  # [B, T, D]
        elif altup_streams is not None:
            x_BTD = altup_streams.merge(x_BTGD)  # [B, T, G, D] -> [B, T, D]
        else:
            x_BTD = merge_streams(x_BTGD)  # [B, T, G, D] -> [B, T, D]
        x_BTD = RMSNorm(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name="final_norm")(
            x_BTD
        )
        # The head runs on one token axis [B*T, D]: its weight gradient (the largest matmul of a
        # small model) is then 2-2.5x faster on XLA:CPU (layers.token_einsum, bench.token_axis);
        # values agree to float rounding.
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)  # [B*T, D]
        if cfg.tie_embeddings:
            logits_NV = embed.attend(x_ND)
        else:
            logits_NV = nn.DenseGeneral(
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (axes.EMBED, axes.VOCAB)
                ),
                name="lm_head",
            )(x_ND)
        logits_BTV = logits_NV.reshape(b, t, -1)  # [B*T, V] -> [B, T, V]
        # float32 logits: the softmax cross-entropy over a large vocabulary needs the range.
        return nn.with_logical_constraint(
            logits_BTV.astype(jnp.float32), (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB)
        )


def _outside_vocab_to_nan(tokens_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Ids outside [0, vocab_size) (negative ones too, which `take` would wrap) become
    vocab_size, whose embedding `take` fills with NaN: a bad id under `jit` gives NaN logits for
    its whole sequence (attention weighs the NaN value by zero for earlier queries, and 0 * NaN
    is NaN), never a finite guess; the batch's other sequences are unaffected."""
    inside_BT = (tokens_BT >= 0) & (tokens_BT < cfg.vocab_size)
    return jnp.where(inside_BT, tokens_BT, cfg.vocab_size)  # [B, T]


def mixing_matrices(
    config: ModelConfig, intermediates: dict[str, Any], field: str = "h_res"
) -> jax.Array:
    """The applied `h_res` of every hyper-connection site in depth order, `[2L, X, G, G]`.

    `field="res_logits"` gives the sown pre-Sinkhorn (or permutation) logits instead, `[2L, X, G,
    G]` for mHC and `[2L, X, n!]` for mHC-lite.

    Attention and FFN sites count separately (layer l gives sites 2l and 2l + 1), X = B*T tokens.
    AltUp has one site per layer, its prediction operator: `[L, X, K, K]`.
    `intermediates` is what `apply(..., mutable=["intermediates"])` returned for a model built with
    `sow_mixing=True` (scanned runs hold their layers stacked on the leading axis).
    """
    if config.hc.kind == "altup":
        return _altup_mixing(config, intermediates)
    sites = []
    for run in layer_runs(config):
        run_tree = intermediates[run.name]
        per_site = []
        for site in ("attention_hc", "ffn_hc"):
            h_res = run_tree[site][field][0]
            if run.stop - run.start == 1:
                h_res = h_res[None]  # [1, B, T, G, G] (or [1, B, T, R] logits)
            per_site.append(h_res)
        # [L_run, 2, B, T, G, G]: attention then FFN within each layer.
        sites.append(jnp.stack(per_site, axis=1))
    stacked = jnp.concatenate(sites, axis=0)
    layers, _, b, t = stacked.shape[:4]
    return stacked.reshape(layers * 2, b * t, *stacked.shape[4:])  # [2L, X, G, G] or [2L, X, R]


def _altup_mixing(config: ModelConfig, intermediates: dict[str, Any]) -> jax.Array:
    """AltUp's prediction operators, one site per layer: `[L, X, K, K]`."""
    per_run = []
    for run in layer_runs(config):
        h_res = intermediates[run.name]["altup"]["h_res"][0]
        per_run.append(h_res[None] if run.stop - run.start == 1 else h_res)  # [L_run, B, T, K, K]
    stacked = jnp.concatenate(per_run, axis=0)
    layers, b, t = stacked.shape[:3]
    return stacked.reshape(layers, b * t, *stacked.shape[3:])  # [L, X, K, K]


def _collect_stats(stats_per_run: list[tuple[Run, dict[str, jax.Array]]]) -> dict[str, Any]:
    """Concatenates per-run statistics along the layer axis, in layer order."""
    aux: dict[str, Any] = {}
    for key in ("moe_load", "moe_balance_loss", "engram_gates", "ultramem_slots"):
        parts = [stats[key] for _, stats in stats_per_run if key in stats]
        if parts:
            aux[key] = jnp.concatenate(parts, axis=0)
    if "moe_balance_loss" in aux:
        aux["moe_balance_loss"] = jnp.sum(aux["moe_balance_loss"])
    return aux


def cross_entropy_loss(
    logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Masked mean next-token cross-entropy (float32) and the number of counted tokens.

    Targets must lie in [0, V) where the mask is nonzero; masked positions may hold anything.
    Concrete targets outside it raise ValueError (traced ones under debug checks, see
    `input_checks`); under `jit` an unmasked target outside [0, V) makes the loss NaN.
    """
    v = logits_BTV.shape[-1]
    input_checks.check_in_range(targets_BT, 0, v, "cross_entropy_loss: targets", mask=mask_BT)
    log_probs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    inside_BT = (targets_BT >= 0) & (targets_BT < v)
    safe_BT = jnp.where(inside_BT, targets_BT, 0)  # [B, T]
    nll_BT = -jnp.take_along_axis(log_probs_BTV, safe_BT[..., None], axis=-1)[..., 0]
    nll_BT = jnp.where(inside_BT, nll_BT, jnp.nan)  # [B, T]
    counted_BT = mask_BT != 0
    count = jnp.sum(mask_BT.astype(jnp.float32))
    total = jnp.sum(jnp.where(counted_BT, nll_BT * mask_BT.astype(jnp.float32), 0.0))
    return total / jnp.maximum(count, 1.0), count
