"""Run code in a subprocess with N simulated CPU devices and return the JSON it prints last.

XLA reads `--xla_force_host_platform_device_count` when jax initialises its backend, so it has to
be set in a fresh process before jax is imported; the test process itself keeps one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any


def run_with_devices(num_devices: int, code: str, timeout: float = 600.0) -> Any:
    """Runs `code` with `num_devices` CPU devices; its last printed line must be one JSON value."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"subprocess with {num_devices} devices failed (exit {result.returncode}):\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-8000:]}"
        )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"subprocess printed nothing; stderr:\n{result.stderr[-8000:]}")
    return json.loads(lines[-1])
