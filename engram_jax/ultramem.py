"""UltraMem (Ultra-Sparse Memory Network, docs/design.md §6) at small scale: a memory layer whose
value rows are addressed by the hidden state.

Per token, with `h = RMSNorm(mean of the streams)`:
1. Tucker-decomposed query-key retrieval (TDQKR): r row queries and r column queries score a
   2-D key grid of n x n virtual slots, `s_row [r, n]`, `s_col [r, n]`; core c scores slot (i, j)
   as `S_c(i, j) = s_row[:, i]^T C_c s_col[:, j]` (h cores `C_c [r, r]`, multi-core scoring).
2. Top-k: the rank-1 part `sigma u v^T` of the mean core preselects the `candidates` best rows
   (by `u^T s_row`) and columns (by `v^T s_col`); the mean core score over that candidate grid
   picks the top-k slots.
3. Implicit value expansion (IVE): virtual slot `v = i n + j` reads physical row `v mod P` of the
   value table `[P, d_v]` (P = n^2 / E) through the projector `W_e [d_v, D]` of its virtual block
   `e = v // P`. Multi-core scoring splits the row into h chunks, chunk c weighted by `S_c`:
   `out = sum_e W_e^T sum_{slots in block e} concat_c(S_c * value_c)`.

Only the k selected value rows receive gradients. The value table is a memory table: the sparse
training step passes it as `values` (outside the gradient) with a zero `delta` on the rows read, and
updates the rows the layer reports (`tables/device_step.py`). The output joins every residual
stream, like Engram's. Every step is per token, so the layer is causal and needs no decode cache.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import axes
from engram_jax.layers import RMSNorm


def rank_one_directions(core_RR: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Leading singular vectors `(u [r], v [r])` of the mean core, signed so that u's largest
    entry (by magnitude) is positive; they rank rows and columns for the preselection."""
    u_RR, _, vt_RR = jnp.linalg.svd(core_RR.astype(jnp.float32))
    u_R, v_R = u_RR[:, 0], vt_RR[0]
    sign = jnp.sign(u_R[jnp.argmax(jnp.abs(u_R))])
    sign = jnp.where(sign == 0, 1.0, sign)
    return u_R * sign, v_R * sign


def tucker_top_k(
    s_row_BTRN: jax.Array, s_col_BTRN: jax.Array, cores_HRR: jax.Array, candidates: int, top_k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The selected slots: `(rows [B, T, k], cols [B, T, k], core scores [B, T, k, H])`."""
    u_R, v_R = rank_one_directions(jax.lax.stop_gradient(jnp.mean(cores_HRR, axis=0)))
    row_proxy_BTN = jnp.einsum("btrn,r->btn", jax.lax.stop_gradient(s_row_BTRN), u_R)
    col_proxy_BTN = jnp.einsum("btrn,r->btn", jax.lax.stop_gradient(s_col_BTRN), v_R)
    _, rows_BTM = jax.lax.top_k(row_proxy_BTN, candidates)  # [B, T, m]
    _, cols_BTM = jax.lax.top_k(col_proxy_BTN, candidates)
    s_row_BTRM = jnp.take_along_axis(s_row_BTRN, rows_BTM[:, :, None, :], axis=-1)  # [B,T,r,m]
    s_col_BTRM = jnp.take_along_axis(s_col_BTRN, cols_BTM[:, :, None, :], axis=-1)
    grid_BTHMM = jnp.einsum("btam,hac,btcn->bthmn", s_row_BTRM, cores_HRR, s_col_BTRM)
    b, t, h, m, _ = grid_BTHMM.shape
    mean_BTX = jnp.mean(grid_BTHMM, axis=2).reshape(b, t, m * m)  # [B, T, m, m] -> [B, T, m*m]
    _, flat_BTK = jax.lax.top_k(jax.lax.stop_gradient(mean_BTX), top_k)  # [B, T, k]
    rows_BTK = jnp.take_along_axis(rows_BTM, flat_BTK // m, axis=-1)
    cols_BTK = jnp.take_along_axis(cols_BTM, flat_BTK % m, axis=-1)
    per_core_BTXH = grid_BTHMM.reshape(b, t, h, m * m).transpose(0, 1, 3, 2)  # [B, T, m*m, H]
    scores_BTKH = jnp.take_along_axis(per_core_BTXH, flat_BTK[..., None], axis=2)
    return rows_BTK, cols_BTK, scores_BTKH


def expanded_values(
    values_PV: jax.Array,
    expansion_EVD: jax.Array,
    slots_BTK: jax.Array,
    scores_BTKH: jax.Array,
    delta_BTKV: jax.Array | None = None,
) -> jax.Array:
    """IVE with multi-core weights: `[B, T, D]` from the selected virtual slots. `delta` (zeros)
    is added to the read rows: its gradient is the gradient of the rows read (sparse updates)."""
    p, dv = values_PV.shape
    e = expansion_EVD.shape[0]
    b, t, k, h = scores_BTKH.shape
    rows_BTKV = jnp.take(values_PV, slots_BTK % p, axis=0)  # [P, dv] take [B, T, k] -> [B,T,k,dv]
    if delta_BTKV is not None:
        rows_BTKV = rows_BTKV + delta_BTKV.astype(rows_BTKV.dtype)
    chunks_BTKHC = rows_BTKV.reshape(b, t, k, h, dv // h)  # [B, T, k, dv] -> [B, T, k, H, dv/H]
    weighted_BTKV = (chunks_BTKHC * scores_BTKH[..., None]).reshape(b, t, k, dv)
    blocks_BTKE = jax.nn.one_hot(slots_BTK // p, e, dtype=weighted_BTKV.dtype)
    per_block_BTEV = jnp.einsum("btkv,btke->btev", weighted_BTKV, blocks_BTKE)
    return jnp.einsum("btev,evd->btd", per_block_BTEV, expansion_EVD)  # [B, T, D]


def _core_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Identity cores plus small noise: at init every core scores like a rank-r product key."""
    h, r, _ = shape
    eye = jnp.broadcast_to(jnp.eye(r, dtype=dtype), shape)
    return eye + 0.02 * jax.random.normal(key, (h, r, r), dtype)


class UltraMem(nn.Module):
    """`x [B, T, G, D] -> [B, T, D]` (the memory read, to be added to every stream)."""

    grid_size: int
    key_dim: int
    tucker_rank: int
    num_cores: int
    top_k: int
    candidates: int
    value_expansion: int
    value_width: int
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x_BTGD: jax.Array,
        return_slots: bool = False,
        values_PV: jax.Array | None = None,
        delta_BTKV: jax.Array | None = None,
    ):
        """`values` (the table, given by the sparse step) replaces the `values` parameter, which
        is then not created; it is read outside the gradient, whose row part flows to `delta`
        `[B, T, k, d_v]` (zeros). With `return_slots` also the read slots `[B, T, k]`."""
        d = x_BTGD.shape[-1]
        n, r, c = self.grid_size, self.tucker_rank, self.key_dim
        p = n * n // self.value_expansion
        h_BTD = RMSNorm(
            eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
        )(jnp.mean(x_BTGD, axis=2))
        query_DARC = self.param(
            "query",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2, 3)),
                (axes.EMBED, None, None, axes.MEMORY_WIDTH),
            ),
            (d, 2, r, c),
            self.param_dtype,
        )
        keys_ARNC = self.param(
            "keys",
            nn.with_logical_partitioning(
                nn.initializers.normal(c**-0.5), (None, None, None, axes.MEMORY_WIDTH)
            ),
            (2, r, n, c),
            self.param_dtype,
        )
        cores_HRR = self.param(
            "cores",
            nn.with_logical_partitioning(_core_init, (None, None, None)),
            (self.num_cores, r, r),
            self.param_dtype,
        )
        if values_PV is None:
            values_PV = self.param(
                "values",
                nn.with_logical_partitioning(
                    nn.initializers.normal(self.value_width**-0.5),
                    (axes.TABLE_ROWS, axes.MEMORY_WIDTH),
                ),
                (p, self.value_width),
                self.param_dtype,
            )
        else:
            values_PV = jax.lax.stop_gradient(values_PV)
        expansion_EVD = self.param(
            "expansion",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(in_axis=1, out_axis=2),
                (axes.MEMORY_TABLES, axes.MEMORY_WIDTH, axes.EMBED),
            ),
            (self.value_expansion, self.value_width, d),
            self.param_dtype,
        )
        q_BTARC = jnp.einsum("btd,darc->btarc", h_BTD, query_DARC.astype(self.dtype))
        s_BTARN = jnp.einsum("btarc,arnc->btarn", q_BTARC, keys_ARNC.astype(self.dtype)) * c**-0.5
        rows_BTK, cols_BTK, scores_BTKH = tucker_top_k(
            s_BTARN[:, :, 0],
            s_BTARN[:, :, 1],
            cores_HRR.astype(self.dtype),
            self.candidates,
            self.top_k,
        )
        slots_BTK = rows_BTK * n + cols_BTK
        out_BTD = expanded_values(
            values_PV.astype(self.dtype),
            expansion_EVD.astype(self.dtype),
            slots_BTK,
            scores_BTKH,
            delta_BTKV,
        )
        return (out_BTD, slots_BTK) if return_slots else out_BTD
