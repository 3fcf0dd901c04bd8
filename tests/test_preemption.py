"""Signals at step boundaries: every process of a run agrees on the step to stop at, and a second
signal exits at once. (Saving and resuming on a signal is tested end to end in test_train.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

_AGREEMENT = """
import json, os, signal, sys
import jax
import numpy as np
process_id = int(sys.argv[1])
jax.distributed.initialize(
    coordinator_address="localhost:{port}", num_processes=2, process_id=process_id,
    initialization_timeout=120,
)
from jax.sharding import Mesh
from engram_jax import preemption

mesh = Mesh(np.asarray(jax.devices()).reshape(2, 1), ("data", "fsdp"))
stop = preemption.StopSignals(mesh, local_rows=1, batch_axes=("data", "fsdp")).install()
stopped_at = None
for step in range(1, 9):
    if process_id == 1 and step == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # only process 1 is preempted
    if stop.should_stop(step):
        stopped_at = step
        break
stop.uninstall()
print(json.dumps({{"step": stopped_at, "signal": stop.agreed, "local": stop.local}}))
"""


def test_processes_agree_on_the_stop_step():
    """SIGTERM reaches process 1 only, after its step 2: both processes stop after step 3 (the
    flags' all-reduce is read one boundary later), and both know the signal."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    code = textwrap.dedent(_AGREEMENT.format(port=port))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [r["step"] for r in results] == [3, 3]
    assert [r["signal"] for r in results] == [signal.SIGTERM, signal.SIGTERM]
    assert [r["local"] for r in results] == [False, True]


def test_second_signal_exits_at_once():
    code = textwrap.dedent(
        """
        import os, signal
        from engram_jax import config, preemption, sharding

        mesh = sharding.mesh_from_config(config.validate(config.base_config()).mesh)
        stop = preemption.StopSignals(mesh, 1, sharding.BATCH_AXES).install()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop(1) and stop.agreed == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        print("not reached")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-3000:]
    assert "not reached" not in result.stdout
    assert "SIGINT received: stopping after this step" in result.stderr
    assert "SIGINT again: exiting now without saving" in result.stderr
