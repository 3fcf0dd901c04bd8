"""OverEncoding's n-gram ids on the host (numpy only, imported by the input pipeline).

`id = (sum_{j<n} x_{i-j} * (V^j mod m)) mod m` for each sub-table of modulus m and order n, exact in
int64 (the powers are Python integers); window positions before the document's first token read
the digit 0. Ids are flat rows of the concatenated table (the sub-table's offset added).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def overencoding_moduli(
    base_rows: int, max_ngram: int, tables_per_ngram: int, step: int, offset: int
) -> tuple[int, ...]:
    """Sizes of the `(max_ngram - 1) * tables_per_ngram` sub-tables, order-major:
    `m_idx = base_rows + step * idx + offset` over the global sub-table index idx."""
    count = (max_ngram - 1) * tables_per_ngram
    return tuple(base_rows + step * idx + offset for idx in range(count))


def table_offsets(moduli: Sequence[int]) -> np.ndarray:
    """`[K]` first row of every sub-table in the concatenated table."""
    return np.concatenate([[0], np.cumsum(np.asarray(moduli, np.int64))[:-1]]).astype(np.int64)


def _orders(max_ngram: int, tables_per_ngram: int) -> list[int]:
    """The n-gram order of every sub-table, order-major (`[2]*k + [3]*k + ...`)."""
    return [n for n in range(2, max_ngram + 1) for _ in range(tables_per_ngram)]


def _windows_host(tokens_BT: np.ndarray, segment_ids_BT: np.ndarray | None, span: int) -> list:
    """`span` arrays `[B, T]`: the token j places back (digit 0 before the document start)."""
    b, t = tokens_BT.shape
    out = [tokens_BT.astype(np.int64)]
    for j in range(1, span):
        shifted = np.zeros((b, t), np.int64)
        shifted[:, j:] = tokens_BT[:, :-j]
        if segment_ids_BT is not None:
            same = np.zeros((b, t), bool)
            same[:, j:] = segment_ids_BT[:, j:] == segment_ids_BT[:, :-j]
            shifted = np.where(same, shifted, 0)
        out.append(shifted)
    return out


def ngram_ids_host(
    tokens_BT: np.ndarray,
    segment_ids_BT: np.ndarray | None,
    vocab_size: int,
    max_ngram: int,
    tables_per_ngram: int,
    moduli: Sequence[int],
) -> np.ndarray:
    """Flat row ids `[B, T, K]` int32 (sub-table id + its offset) of every sub-table, computed
    exactly in int64 with the precomputed `V^j mod m` (Python integers)."""
    orders = _orders(max_ngram, tables_per_ngram)
    windows = _windows_host(np.asarray(tokens_BT), segment_ids_BT, max_ngram)
    offsets = table_offsets(moduli)
    per_table = []
    for k, (order, m) in enumerate(zip(orders, moduli, strict=True)):
        ids = np.zeros(tokens_BT.shape, np.int64)
        for j in range(order):
            # x < V <= 2**31 and V^j mod m < 2**31: the product fits int64.
            ids = (ids + windows[j] * (pow(vocab_size, j, m))) % m
        per_table.append(ids + offsets[k])
    return np.stack(per_table, axis=-1).astype(np.int32)  # K x [B, T] -> [B, T, K]


@dataclasses.dataclass(frozen=True)
class OverEncodingIds:
    """What the input pipeline needs to add `overencoding_ids [B, T, K]` to a batch."""

    vocab_size: int
    max_ngram: int
    tables_per_ngram: int
    moduli: tuple[int, ...]

    @classmethod
    def from_model_config(cls, model_config) -> OverEncodingIds | None:
        """The spec of a validated `ModelConfig`; None when OverEncoding is off."""
        o = model_config.overencoding
        if not o.active:
            return None
        moduli = overencoding_moduli(
            o.base_rows, o.max_ngram, o.tables_per_ngram, o.modulus_step, o.modulus_offset
        )
        return cls(model_config.vocab_size, o.max_ngram, o.tables_per_ngram, moduli)

    def __call__(self, tokens_BT: np.ndarray, segment_ids_BT: np.ndarray | None) -> np.ndarray:
        return ngram_ids_host(
            tokens_BT,
            segment_ids_BT,
            self.vocab_size,
            self.max_ngram,
            self.tables_per_ngram,
            self.moduli,
        )
