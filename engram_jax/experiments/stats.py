"""Paired comparisons of runs that share a seed.

Runs of one comparison with the same pairing key (`pair` in results.json: the seed, and the
budget where an experiment has several) read the same batches in the same order and start from
the same values of every parameter the models share, so the difference of their final losses
removes most of what the seed alone moves. The interval is Student's t on those per-pair
differences; an interval containing zero means the comparison is undecided at this budget.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """`treatment - reference` of one metric over the pairs both have a finite value for."""

    treatment: str
    reference: str
    pairs: tuple[str, ...]
    differences: tuple[float, ...]
    mean: float
    low: float  # Bounds of the confidence interval of the mean; NaN with fewer than 2 pairs.
    high: float

    @property
    def decided(self) -> bool:
        """True when the interval exists and excludes zero."""
        return math.isfinite(self.low) and (self.low > 0 or self.high < 0)

    def verdict(self) -> str:
        if len(self.differences) < 2:
            return "no interval from fewer than 2 pairs (undecided)"
        if not self.decided:
            return "the interval contains zero (undecided at this budget)"
        side = "higher" if self.low > 0 else "lower"
        return f"the interval excludes zero ({self.treatment} {side})"


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean; (mean, nan, nan) below 2 values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    from scipy import stats  # a dependency of jax

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_difference(
    runs: Sequence[dict[str, Any]],
    label: str,
    treatment: Any,
    reference: Any,
    metric: str = "final_eval_loss",
) -> PairedDifference:
    """The per-pair differences `run[metric]` of the runs with `run[label] == treatment` minus
    those with `reference`, matched by `run["pair"]`; pairs where either is missing or diverged
    (None) are left out."""
    by_pair: dict[str, dict[Any, float | None]] = {}
    for run in runs:
        if run[label] in (treatment, reference):
            by_pair.setdefault(run["pair"], {})[run[label]] = run[metric]
    pairs, diffs = [], []
    for pair, values in by_pair.items():
        a, b = values.get(treatment), values.get(reference)
        if a is not None and b is not None:
            pairs.append(pair)
            diffs.append(a - b)
    mean, low, high = t_interval(diffs)
    return PairedDifference(
        str(treatment), str(reference), tuple(pairs), tuple(diffs), mean, low, high
    )
