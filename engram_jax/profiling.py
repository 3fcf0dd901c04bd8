"""`config.profile_steps=(start, stop)`: a jax.profiler trace of training steps start..stop-1.

The trace goes where TensorBoard's profile plugin looks: `<logdir>/plugins/profile/<run>/` with
`<logdir>` = `<workdir>/tensorboard` for process 0 and `<workdir>/tensorboard/process_<i>` for the
others (processes sharing a host would otherwise write the same file name).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

logger = logging.getLogger(__name__)


def trace_dir(workdir: str, process_index: int) -> str:
    """The log directory a process hands to `jax.profiler.start_trace`."""
    base = os.path.join(workdir, "tensorboard")
    return base if process_index == 0 else os.path.join(base, f"process_{process_index}")


class StepProfiler:
    """Starts a trace before step `start` runs and stops it once step `stop - 1` has finished.

    Steps are numbered as in the metrics (the state's step after the update). A run resumed past
    `start` traces nothing.
    """

    def __init__(self, workdir: str, steps: tuple[int, ...], process_index: int = 0):
        self._steps = tuple(steps)
        self._dir = trace_dir(workdir, process_index)
        self._active = False

    def before_step(self, step: int) -> None:
        """Call with the number the next step will have."""
        if self._steps and step == self._steps[0] and not self._active:
            os.makedirs(self._dir, exist_ok=True)
            jax.profiler.start_trace(self._dir)
            self._active = True
            logger.info("profiling steps %d..%d into %s", *self._steps, self._dir)

    def after_step(self, step: int, outputs: Any) -> None:
        """Call after step `step` was dispatched, with its outputs (waited for when stopping)."""
        if self._active and step >= self._steps[1] - 1:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops a running trace (the loop ended or failed first)."""
        if self._active:
            self._active = False
            jax.profiler.stop_trace()
            logger.info("profile written to %s/plugins/profile", self._dir)
