"""OverEncoding (Over-Tokenized Transformer, docs/design.md §5): hierarchical n-gram input
embeddings added to the token embedding at the input.

The n-gram id of order n at position i is the base-V number of the window reduced modulo the
sub-table's size, `id = (sum_j x_{i-j} * (V^j mod m)) mod m`; each order has k sub-tables of
distinct moduli, all concatenated in one memory table (`overencoding/table`), each followed by its
own projection to the model width. Window positions before the document's first token read the
digit 0.

- `overencoding_ids` (numpy only): the moduli and the host ids (exact int64) that the input
  pipeline adds to each batch as the field `overencoding_ids`.
- `ngram_ids_device`: the same ids in jax (uint32, exact for moduli below 2**31), used by the
  decode step and when a caller passes no host ids.
- `OverEncoding`: the Linen module combining the embedded tokens with the projected rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import axes
from engram_jax.overencoding_ids import _orders, table_offsets


def _mulmod(x: jax.Array, c: jax.Array, m: jax.Array, bits: int) -> jax.Array:
    """`(x * c) mod m` in uint32 for x < 2**bits, c < m <= 2**31: double-and-add over x's bits
    keeps every intermediate below 2m <= 2**32."""
    acc = jnp.zeros(jnp.broadcast_shapes(x.shape, c.shape), jnp.uint32)
    for bit in reversed(range(bits)):
        acc = (acc * 2) % m
        take = ((x >> bit) & 1).astype(bool)
        acc = jnp.where(take, (acc + c) % m, acc)
    return acc


def ngram_ids_device(
    tokens_BT: jax.Array,
    segment_ids_BT: jax.Array | None,
    vocab_size: int,
    max_ngram: int,
    tables_per_ngram: int,
    moduli: Sequence[int],
) -> jax.Array:
    """`overencoding_ids.ngram_ids_host` in jax: flat row ids `[B, T, K]` int32, bit-equal to
    the host ids."""
    orders = _orders(max_ngram, tables_per_ngram)
    m_11K = jnp.asarray(moduli, jnp.uint32)[None, None, :]  # [1, 1, K]
    offsets_11K = jnp.asarray(table_offsets(moduli), jnp.int32)[None, None, :]
    # [N, K]: V^j mod m_k, exact Python integers (zero where order_k <= j).
    powers_NK = np.array(
        [
            [pow(vocab_size, j, m) if j < n else 0 for n, m in zip(orders, moduli, strict=True)]
            for j in range(max_ngram)
        ],
        np.uint32,
    )
    bits = max(1, (vocab_size - 1).bit_length())
    tokens_BT = tokens_BT.astype(jnp.uint32)
    b, t = tokens_BT.shape
    ids_BTK = jnp.zeros((b, t, len(moduli)), jnp.uint32)
    for j in range(max_ngram):
        shifted_BT = jnp.pad(tokens_BT, ((0, 0), (j, 0)))[:, :t]  # x_{i-j}, 0 before the row
        if segment_ids_BT is not None and j:
            seg_BT = jnp.asarray(segment_ids_BT)
            same_BT = jnp.pad(seg_BT, ((0, 0), (j, 0)), constant_values=-1)[:, :t] == seg_BT
            shifted_BT = jnp.where(same_BT, shifted_BT, 0)
        powers_11K = jnp.asarray(powers_NK[j])[None, None, :]
        term_BTK = _mulmod(shifted_BT[..., None], powers_11K, m_11K, bits)  # [B, T, K]
        ids_BTK = (ids_BTK + term_BTK) % m_11K
    return ids_BTK.astype(jnp.int32) + offsets_11K  # [B, T, K]


def combine(
    embedded_BTD: jax.Array, rows_BTKW: jax.Array, projection_KWD: jax.Array, average: bool
) -> jax.Array:
    """`(E1 + sum_k rows_k W_k) / (1 + K)` (average) or without the division (sum)."""
    projected_BTD = jnp.einsum("btkw,kwd->btd", rows_BTKW, projection_KWD)  # [B, T, D]
    total_BTD = embedded_BTD + projected_BTD.astype(embedded_BTD.dtype)
    return total_BTD / (1 + rows_BTKW.shape[2]) if average else total_BTD


class OverEncoding(nn.Module):
    """n-gram input embeddings: `(embedded [B, T, D], tokens [B, T], ...) -> [B, T, D]`.

    With `ids [B, T, K]` (host ids, `overencoding_ids.ngram_ids_host`) the rows are read at
    them; without, the ids are computed on the device. `rows [B, T, K, W]` (already gathered,
    sparse table training) replace the table, which is then not created. With `decode=True` the
    `cache` collection holds the last `max_ngram - 1` tokens of each row (digit 0 before the
    first).
    """

    vocab_size: int
    max_ngram: int
    tables_per_ngram: int
    moduli: tuple[int, ...]
    row_width: int
    average: bool = True
    table_init: nn.initializers.Initializer = nn.initializers.normal(1.0)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    table_dtype: jnp.dtype = jnp.float32
    decode: bool = False

    def _decode_ids(self, tokens_BT: jax.Array) -> jax.Array:
        span = self.max_ngram - 1
        b, t = tokens_BT.shape
        ready = self.has_variable("cache", "history")
        history = self.variable("cache", "history", jnp.zeros, (b, span), jnp.int32)
        full_BS = jnp.concatenate([history.value, tokens_BT.astype(jnp.int32)], axis=1)
        ids = ngram_ids_device(
            full_BS, None, self.vocab_size, self.max_ngram, self.tables_per_ngram, self.moduli
        )[:, span:]  # [B, T, K]: the chunk's positions, windows reaching into the history
        if ready:
            history.value = full_BS[:, -span:] if span else history.value
        return ids

    @nn.compact
    def __call__(
        self,
        embedded_BTD: jax.Array,
        tokens_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        ids_BTK: jax.Array | None = None,
        rows_BTKW: jax.Array | None = None,
    ) -> jax.Array:
        k, w, d = len(self.moduli), self.row_width, embedded_BTD.shape[-1]
        if k == 0:
            return embedded_BTD  # N = 1: the 1-gram alone, which is the token embedding
        projection_KWD = self.param(
            "projection",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=2),
                (axes.MEMORY_TABLES, axes.MEMORY_WIDTH, axes.EMBED),
            ),
            (k, w, d),
            self.param_dtype,
        )
        if rows_BTKW is None:
            table_RW = self.param(
                "table",
                nn.with_logical_partitioning(self.table_init, (axes.TABLE_ROWS, axes.MEMORY_WIDTH)),
                (sum(self.moduli), w),
                self.table_dtype,
            )
            if self.decode:
                ids_BTK = self._decode_ids(tokens_BT)
            elif ids_BTK is None:
                ids_BTK = ngram_ids_device(
                    tokens_BT,
                    segment_ids_BT,
                    self.vocab_size,
                    self.max_ngram,
                    self.tables_per_ngram,
                    self.moduli,
                )
            rows_BTKW = jnp.take(table_RW, ids_BTK, axis=0)  # [R, W] take [B, T, K] -> [B, T, K, W]
        rows_BTKW = rows_BTKW.astype(self.dtype)
        return combine(embedded_BTD, rows_BTKW, projection_KWD.astype(self.dtype), self.average)
