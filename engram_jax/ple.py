"""Per-layer embeddings (Gemma 3n, docs/design.md §7.1): a second token-indexed table gives every
layer a small vector, which each block injects through a gated up-projection.

    P   = E_ple[token'] * sqrt(p)                   [B, T, L, p]  (token' = 0 outside the table)
    Q   = RMSNorm_p((emb W_proj) * d^-1/2)          [B, T, L, p]
    ple = (Q + P) * 2^-1/2
    after block l:  g = gelu_tanh(W_gate (s * y)),  u = RMSNorm_d(W_up (g * ple_l)),  x += u

The table (`ple/table`, `[V_ple, L * p]`) is a memory table: it trains with the table optimizer
and checkpoints in the `memory` item. `per_layer_inputs` builds `ple`; `PleInjection` is the
per-block part.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import axes
from engram_jax.layers import RMSNorm, rms_norm


def ple_token_ids(tokens_BT: jax.Array, table_rows: int, xp: Any = jnp) -> jax.Array:
    """Table rows of the tokens: ids outside `[0, table_rows)` read row 0 (Gemma 3n's rule).
    `xp=np` computes them on the host (host tables)."""
    inside = (tokens_BT >= 0) & (tokens_BT < table_rows)
    return xp.where(inside, tokens_BT, 0).astype(xp.int32)


def mix_per_layer_inputs(
    rows_BTX: jax.Array, projected_BTX: jax.Array, norm_scale_P: jax.Array, width: int, eps: float
) -> jax.Array:
    """`ple [B, T, L, p]` from the table rows and the embedding's projection (both `[B, T, L*p]`,
    the projection already scaled by d^-1/2)."""
    b, t, x = rows_BTX.shape
    layers = x // width
    table_BTLP = rows_BTX.reshape(b, t, layers, width) * math.sqrt(
        width
    )  # [B, T, L*p] -> [B,T,L,p]
    projected_BTLP = rms_norm(projected_BTX.reshape(b, t, layers, width), norm_scale_P, eps)
    return (projected_BTLP + table_BTLP.astype(projected_BTLP.dtype)) * (2.0**-0.5)


class PerLayerInputs(nn.Module):
    """`(embedded [B, T, D], tokens [B, T]) -> ple [B, T, L, p]`; `rows [B, T, L*p]` (already
    gathered table rows) replace the table, which is then not created."""

    num_layers: int
    width: int
    table_rows: int
    norm_eps: float = 1e-6
    table_init: nn.initializers.Initializer = nn.initializers.normal(1.0)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    table_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, embedded_BTD: jax.Array, tokens_BT: jax.Array, rows_BTX: jax.Array | None = None
    ) -> jax.Array:
        x, d = self.num_layers * self.width, embedded_BTD.shape[-1]
        if rows_BTX is None:
            table_RX = self.param(
                "table",
                nn.with_logical_partitioning(self.table_init, (axes.TABLE_ROWS, axes.MEMORY_WIDTH)),
                (self.table_rows, x),
                self.table_dtype,
            )
            rows_BTX = jnp.take(table_RX, ple_token_ids(tokens_BT, self.table_rows), axis=0)
        projection_DX = self.param(
            "projection",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
                (axes.EMBED, axes.MEMORY_WIDTH),
            ),
            (d, x),
            self.param_dtype,
        )
        norm_scale_P = self.param(
            "projection_norm",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,)),
            (self.width,),
            self.param_dtype,
        )
        embedded = embedded_BTD.astype(self.dtype)
        projected_BTX = (embedded @ projection_DX.astype(self.dtype)) * d**-0.5  # [B, T, L*p]
        return mix_per_layer_inputs(
            rows_BTX.astype(self.dtype), projected_BTX, norm_scale_P, self.width, self.norm_eps
        )


class PleInjection(nn.Module):
    """One block's PLE update `u [B, T, D]` from its output `y [B, T, D]` and `ple_l [B, T, p]`."""

    width: int
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y_BTD: jax.Array, ple_BTP: jax.Array) -> jax.Array:
        d = y_BTD.shape[-1]
        scale_D = self.param(
            "input_scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,)),
            (d,),
            self.param_dtype,
        )
        gate_DP = self.param(
            "gate",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (axes.EMBED, axes.MEMORY_WIDTH)
            ),
            (d, self.width),
            self.param_dtype,
        )
        up_PD = self.param(
            "up",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (axes.MEMORY_WIDTH, axes.EMBED)
            ),
            (self.width, d),
            self.param_dtype,
        )
        y = y_BTD.astype(self.dtype) * scale_D.astype(self.dtype)[None, None, :]
        g_BTP = jax.nn.gelu(y @ gate_DP.astype(self.dtype), approximate=True)  # [B, T, p]
        up_BTD = (g_BTP * ple_BTP.astype(self.dtype)) @ up_PD.astype(self.dtype)  # [B, T, D]
        return RMSNorm(
            eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="post_norm"
        )(up_BTD)
