"""Timing helpers shared by the benchmarks: warm-up, block_until_ready, medians, machine line."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def _block(value: Any) -> Any:
    return jax.block_until_ready(value)


def time_call(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall-clock seconds of `fn()` after `warmup` untimed calls, waiting for the device."""
    for _ in range(warmup):
        _block(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved_samples(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall-clock seconds of each `fn()` (waiting for the device), timed in turn, round after
    round, so that a change of machine load hits every variant alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            _block(fn())
            samples[name].append(time.perf_counter() - start)
    return samples


def machine_description() -> str:
    """One line naming the CPU model, core count and JAX backend devices."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devices = jax.devices()
    return (
        f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__}, "
        f"{len(devices)} x {devices[0].device_kind}"
    )


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Prints rows as a Markdown table, so output pastes straight into BENCHMARKS.md."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        print("| " + " | ".join(cells) + " |")
