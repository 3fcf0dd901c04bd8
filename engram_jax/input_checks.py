"""Checks of the ids, labels and rates that library functions receive, eagerly and under `jit`.

A concrete argument (eager call, or a Python number) is always checked: a bad value raises
ValueError naming the argument, the offending value and the expected range. Under `jax.jit` the
values are unknown while tracing, so by default nothing is checked and each function documents
what it computes for bad values (e.g. `Transformer` gives NaN logits at out-of-vocabulary token
ids). To check under `jit` too, turn on debug checks and run the function through
`jax.experimental.checkify`:

    from jax.experimental import checkify
    with engram_jax.input_checks.debug_checks():  # or ENGRAM_JAX_DEBUG_CHECKS=1
        checked = checkify.checkify(jax.jit(step), errors=checkify.user_checks)
        err, out = checked(state, batch)
    err.throw()  # ValueError-like JaxRuntimeError naming the argument, or nothing

The flag is read while tracing: a function jitted and traced before it was turned on keeps its
unchecked compiled form (wrap a fresh function). With debug checks on, a traced function that is
NOT wrapped in `checkify` fails to trace ("checkify.check ... not functionalized"): the flag is
for debugging runs only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

DEBUG_ENV = "ENGRAM_JAX_DEBUG_CHECKS"
_debug = [os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")]


def debug_checks_enabled() -> bool:
    return _debug[-1]


@contextlib.contextmanager
def debug_checks(enabled: bool = True) -> Iterator[None]:
    """Within this block (while tracing), traced arguments get `checkify.check`s."""
    _debug.append(enabled)
    try:
        yield
    finally:
        _debug.pop()


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_in_range(
    values: jax.Array, low: int, high: int, what: str, *, mask: jax.Array | None = None
) -> None:
    """Every value (where `mask` is nonzero) lies in `[low, high)`: ValueError when concrete,
    a `checkify.check` when traced with debug checks on, nothing otherwise."""
    if is_traced(values) or is_traced(mask):
        if debug_checks_enabled():
            from jax.experimental import checkify

            ok = (values >= low) & (values < high)
            if mask is not None:
                ok = ok | (mask == 0)
            checkify.check(
                jnp.all(ok),
                f"{what}: a value outside [{low}, {high}) (first at flat index {{index}})",
                index=jnp.argmin(ok.reshape(-1)),
            )
        return
    array = np.asarray(values)
    bad = (array < low) | (array >= high)
    if mask is not None:
        bad &= np.asarray(mask) != 0
    if bad.any():
        index = np.unravel_index(int(np.argmax(bad)), array.shape)
        raise ValueError(
            f"{what}: got {int(array[index])} at index {tuple(int(i) for i in index)} "
            f"({int(bad.sum())} value(s) outside the range); expected values in [{low}, {high})"
        )


def check_finite(values: jax.Array, what: str) -> None:
    """Every value is finite: ValueError when concrete, a `checkify.check` when traced with debug
    checks on, nothing otherwise."""
    if is_traced(values):
        if debug_checks_enabled():
            from jax.experimental import checkify

            checkify.check(jnp.all(jnp.isfinite(values)), f"{what}: a non-finite value")
        return
    array = np.asarray(values)
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: got {array.tolist()}; expected finite values")
