"""The package's public names resolve, and the host-side hashing imports without jax."""

import subprocess
import sys

import engram_jax


def test_every_public_name_resolves():
    for name in engram_jax.__all__:
        assert getattr(engram_jax, name) is not None, name


def test_hashing_imports_without_jax():
    code = "import sys, engram_jax.hashing; print('jax' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
