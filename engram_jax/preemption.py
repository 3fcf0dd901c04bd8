"""Stopping on SIGTERM (Cloud TPU preemption) and SIGINT (Ctrl-C) at a step boundary.

The handler only records the signal; the training loop asks `StopSignals.should_stop(step)` once
per step and, when it says so, saves the current step and returns. Every process of a
multi-process run must stop at the same step (the save is collective), so there the local flags
are combined by a small all-reduce that is dispatched at each boundary and read one boundary
later, when the device has long finished it: no extra host-device wait, and a stop requested on
any process is honoured by all of them one step later. A second signal exits at once.

jax's own preemption service (`multihost_utils.reached_preemption_sync_point`) is not used: it
hears SIGTERM only (not Ctrl-C), and orbax also calls it with the step of each checkpoint it
finalises, from a background thread, which moves the step counter the service agrees on. While
these handlers are installed they replace that service's SIGTERM handler.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from types import FrameType

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """Training stopped early on a signal after saving a checkpoint of `step`."""

    def __init__(self, signum: int, step: int, where: str, *, local: bool = True):
        self.signum, self.step = signum, step
        name = signal.Signals(signum).name
        source = name if local else f"{name} on another process"
        super().__init__(
            f"stopped by {source} at step {step}: checkpoint saved in {where}; run the same "
            "command again to resume from it"
        )

    @property
    def exit_code(self) -> int:
        """128 + signal number, the shell's code for a process ended by that signal."""
        return 128 + self.signum


class StopSignals:
    """Records SIGTERM/SIGINT while installed and decides, identically on every process, at
    which step to stop.

    Args:
      mesh: the training mesh; with several processes the flags are reduced over it.
      local_rows: this process's share of an array split over `batch_axes` (its batch rows).
      batch_axes: mesh axes the batch is split over.
      signals: the signals to catch.
    """

    def __init__(
        self,
        mesh: Mesh,
        local_rows: int,
        batch_axes: Sequence[str],
        signals: Sequence[int] = SIGNALS,
    ):
        self._signals = tuple(signals)
        self._received = 0  # signal number of the first signal on this process, 0 for none
        self._previous: dict[int, object] = {}
        self._in_flight: jax.Array | None = None
        self.agreed = 0  # signal number the processes agreed to stop on, 0 for none
        self.local = True  # whether this process received the agreed signal itself
        self._multi = jax.process_count() > 1
        if self._multi:
            self._local_rows = local_rows
            self._sharding = NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))
            replicated = NamedSharding(mesh, PartitionSpec())
            self._reduce = jax.jit(jnp.max, out_shardings=replicated)

    def install(self) -> StopSignals:
        """Installs the handlers (main thread only; elsewhere signals keep their handlers)."""
        if threading.current_thread() is not threading.main_thread():
            logger.info("not in the main thread: SIGTERM/SIGINT will not save a checkpoint")
            return self
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Restores the handlers that were in place before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if self._received:
            # Second signal: the user (or the scheduler) will not wait for the checkpoint.
            os.write(
                2,
                f"\n{name} again: exiting now without saving; the last committed checkpoint "
                "is kept\n".encode(),
            )
            os._exit(128 + signum)
        self._received = signum
        # The handler runs between bytecodes of the main thread; logging here could deadlock on
        # the logging lock, so the message goes straight to stderr.
        os.write(
            2,
            f"\n{name} received: stopping after this step and saving a checkpoint "
            f"(send {name} again to exit at once without saving)\n".encode(),
        )

    def should_stop(self, step: int) -> bool:
        """True when every process should save and stop after `step`. Call it once per step on
        every process (in multi-process runs it takes part in a collective)."""
        del step  # the same call sequence on every process is what keeps them in step
        if not self._multi:
            self.agreed = self._received
            return bool(self.agreed)
        # Dispatch this boundary's reduction, read the previous one's (long finished by now).
        local_R = np.full((self._local_rows,), self._received, np.int32)
        flags = jax.make_array_from_process_local_data(self._sharding, local_R)
        previous, self._in_flight = self._in_flight, self._reduce(flags)
        if previous is None:
            return False
        self.agreed = int(jax.device_get(previous))
        self.local = self.agreed == self._received
        return bool(self.agreed)
