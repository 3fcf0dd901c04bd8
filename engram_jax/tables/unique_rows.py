"""Distinct table rows and the index of each id among them: the one deduplication behind the data
pipeline's `memory_ids`/`memory_inverse` (`data.unique_table_rows`), the device update's sum of a
row's gradients over batch groups (`device_step`) and the host tables' (`host_tables`).

The contract, for `xp=numpy` (host, any size) and `xp=jax.numpy` (under `jit`, static `size`):

- `unique` holds the distinct values of `ids` in ascending order, then `fill_value` up to `size`
  (`size=None`, numpy only: exactly the distinct values);
- `inverse` has the shape of `ids` and `unique[inverse] == ids` everywhere.

One function serves both namespaces because only the call differs: `jax.numpy.unique` needs a
static `size` (and pads itself), `numpy.unique` returns the exact count and is padded here. A value
equal to `fill_value` among `ids` is an ordinary value (callers use an out-of-range sentinel).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def unique_rows(
    ids: Any, *, size: int | None = None, fill_value: int = -1, xp: Any = np
) -> tuple[Any, Any]:
    """`(unique, inverse)` of integer `ids` (module docstring: the contract)."""
    if xp is np:
        unique, inverse = np.unique(np.asarray(ids).reshape(-1), return_inverse=True)
        if size is not None:
            if size < unique.size:
                raise ValueError(f"unique_rows: {unique.size} distinct ids exceed size={size}")
            unique = np.concatenate([unique, np.full(size - unique.size, fill_value, unique.dtype)])
        return unique, inverse.reshape(np.shape(ids))
    if size is None:
        raise ValueError("unique_rows: xp=jax.numpy needs a static size")
    unique, inverse = xp.unique(
        ids.reshape(-1), size=size, fill_value=fill_value, return_inverse=True
    )
    return unique, inverse.reshape(ids.shape)


def sum_rows(
    ids_N: Any, values_NW: Any, *, size: int | None = None, fill_value: int = -1, xp: Any = np
) -> tuple[Any, Any]:
    """`(unique [U], summed [U, W])`: the rows of `values_NW` summed per distinct id of `ids_N`
    (`unique` as `unique_rows` gives it; padding slots sum nothing, so they hold zeros)."""
    unique, inverse = unique_rows(ids_N, size=size, fill_value=fill_value, xp=xp)
    shape = (unique.shape[0], values_NW.shape[1])
    if xp is np:
        summed = np.zeros(shape, np.float32)
        np.add.at(summed, inverse, values_NW)
        return unique, summed
    return unique, xp.zeros(shape, values_NW.dtype).at[inverse].add(values_NW)
