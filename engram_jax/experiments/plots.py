"""Headless matplotlib helpers for the experiments' PNGs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: experiments run on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from engram_jax.metrics import last_by_step, read_metrics  # noqa: E402


def new_figure(width: float = 6.4, height: float = 4.2, ncols: int = 1, nrows: int = 1):
    """A figure of nrows x ncols panels (each width x height inches), laid out on save."""
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, layout="constrained"
    )
    return fig, axes


def save(fig, workdir: str, name: str) -> str:
    """Writes `<workdir>/<name>` and returns `name` (for links in summary.md)."""
    path = os.path.join(workdir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return name


def metric_curve(workdir: str, run: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric of one run, from its metrics.jsonl."""
    rows = read_metrics(os.path.join(workdir, run["run_dir"]))
    steps, values = last_by_step(rows, key)
    return np.asarray(steps), np.asarray(values, dtype=np.float64)


def seed_band(
    ax,
    workdir: str,
    runs: Sequence[dict[str, Any]],
    key: str,
    label: str,
    color: Any = None,
) -> bool:
    """Mean over seeds of `key` against step, with the min-max band; False if nothing logged."""
    curves = [metric_curve(workdir, run, key) for run in runs]
    curves = [c for c in curves if c[0].size]
    if not curves:
        return False
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
    if not common:
        return False
    stack = np.stack([v[np.searchsorted(s, common)] for s, v in curves])  # [seeds, steps]
    (line,) = ax.plot(common, stack.mean(axis=0), label=label, color=color)
    if stack.shape[0] > 1:
        ax.fill_between(common, stack.min(0), stack.max(0), color=line.get_color(), alpha=0.2)
    return True
