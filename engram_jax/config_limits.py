"""Config values no run can use, refused by `config.validate` before the per-section checks:
non-finite floats anywhere in the tree, and sizes beyond what any device holds or int32 indexes
(docs/design.md §16), and the choice and integer checks every section's validator uses. Each
check reports through `p.check(ok, field, value, expected)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import ml_collections

# Float keys where +inf means "no limit" and trains normally (clip_norm=inf never clips).
INFINITY_MEANS_NO_LIMIT = ("clip_norm",)


def check_finite(p: Any, config: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Every float value (also inside tuples) is finite: inf or NaN in a learning rate, an eps or
    a scale trains to NaN instead of failing here. NaN is refused everywhere; +inf only where
    it means no limit (`INFINITY_MEANS_NO_LIMIT`)."""
    for key, value in config.items():
        field = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            check_finite(p, value, field + ".")
            continue
        allowed = (math.inf,) if field in INFINITY_MEANS_NO_LIMIT else ()
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) and v not in allowed for v in values):
            p.check(False, field, value, "a finite number" + (" or inf" if allowed else ""))


# Upper bounds of sizes whose products index int32 arrays or that no device can hold: beyond
# them a run fails late (an overflow, or memory running out while compiling) instead of here.
SIZE_LIMITS = {
    "seq_len": 2**20,
    "batch_size": 2**24,
    "model.vocab_size": 2**31 - 1,
    "model.hc.n_streams": 64,
    "model.hc.sinkhorn_iters": 10_000,
}


def check_sizes(p: Any, config: ml_collections.ConfigDict) -> None:
    for field, limit in SIZE_LIMITS.items():
        value = config
        for part in field.split("."):
            value = value.get(part) if isinstance(value, ml_collections.ConfigDict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            p.check(value <= limit, field, value, f"<= {limit:,} (docs/design.md §16)")


def check_choice(p: Any, field: str, value: Any, choices: Sequence[str]) -> None:
    p.check(value in choices, field, value, f"one of {list(choices)}")


def check_positive(p: Any, field: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (value >= 0 if allow_zero else value > 0)
    )
    p.check(ok, field, value, "an integer >= 0" if allow_zero else "an integer > 0")
