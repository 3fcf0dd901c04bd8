"""What the processes of one job do together outside the compiled step: run a piece of work on
process 0 only (its failure reaching every process) and check that every process means the same
thing by a token id and a table row.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)


class ProcessMismatchError(RuntimeError):
    """Processes of one job disagree on what the tokens or table rows mean."""


_MESSAGE_BYTES = 4096


def run_on_process_zero(fn: Callable[[], Any], what: str) -> Any:
    """Runs `fn` on process 0 only and returns its result there (None elsewhere).

    Every process returns only once process 0 has finished (a barrier); when `fn` raised, process
    0 re-raises it and the others raise a RuntimeError quoting it, so no process is left waiting
    at a later collective.
    """
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    if jax.process_count() > 1:
        message = b"" if error is None else f"{type(error).__name__}: {error}".encode()
        message = message[:_MESSAGE_BYTES]
        encoded = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
        encoded[0] = error is not None
        encoded[1 : 1 + len(message)] = np.frombuffer(message, np.uint8)
        received = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
        if jax.process_index() != 0 and received[0]:
            text = bytes(received[1:]).rstrip(b"\0").decode("utf-8", "replace")
            raise RuntimeError(f"process 0 failed while {what}: {text}")
    if error is not None:
        raise error
    return result


def check_processes_agree(fingerprints: dict[str, str]) -> None:
    """Raises `ProcessMismatchError` on every process when any process's fingerprints differ from
    process 0's, naming each such process and fingerprint. A no-op with one process."""
    if jax.process_count() == 1:
        return
    names = sorted(fingerprints)
    local = np.stack(  # [F, 32] sha256 of each fingerprint string
        [np.frombuffer(hashlib.sha256(fingerprints[n].encode()).digest(), np.uint8) for n in names]
    )
    gathered = np.asarray(multihost_utils.process_allgather(local))  # [P, F, 32]
    differences = [
        f"process {p}: {names[f]}"
        for p in range(1, gathered.shape[0])
        for f in range(len(names))
        if not np.array_equal(gathered[p, f], gathered[0, f])
    ]
    if differences:
        raise ProcessMismatchError(
            "processes disagree with process 0 on what tokens and table rows mean ("
            + "; ".join(differences)
            + "): every process must load the same tokenizer and hashing configuration"
        )
