"""The shipped configs: `--config=<name>` resolves to the files installed with the package, also
from another directory after a non-editable install (a wheel built here, installed into a
temporary directory), and `python -m engram_jax.configs` lists them with their parameter counts."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engram_jax import configs
from engram_jax.accounting import account
from engram_jax.config import load_config_file, validate

REPO = Path(__file__).resolve().parent.parent


def test_top_level_configs_is_the_packaged_directory():
    # One copy of each config: the repository's configs/ is the package's directory.
    assert (REPO / "configs").resolve() == configs.CONFIG_DIR
    assert "tiny" in configs.config_names() and "engram_27b" in configs.config_names()


def test_resolve_names_paths_and_unknown_names(tmp_path, monkeypatch):
    assert configs.resolve("tiny") == str(configs.CONFIG_DIR / "tiny.py")
    assert configs.resolve("configs/tiny.py") == "configs/tiny.py"  # a path is left alone
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("")  # an existing file wins over the shipped name
    assert configs.resolve("tiny") == "tiny"
    assert configs.resolve_argv(["prog", "--config=small_cpu", "--config.seq_len=8"]) == [
        "prog",
        f"--config={configs.CONFIG_DIR / 'small_cpu.py'}",
        "--config.seq_len=8",
    ]
    assert configs.resolve_argv(["prog", "--config", "dense_4b"])[2].endswith("dense_4b.py")
    with pytest.raises(FileNotFoundError, match=r"'tinny'.*small_cpu, tiny"):
        configs.resolve("tinny")
    with pytest.raises(SystemExit):
        configs.resolve_argv(["prog", "--config=tinny"])


def test_listing_has_every_config_with_its_accounting():
    from engram_jax.configs.__main__ import table

    listing = table()
    for name in configs.config_names():
        config = validate(load_config_file(configs.config_path(name)))
        total = account(config.model, config.train.seq_len).total_params
        (line,) = [row for row in listing.splitlines() if row.startswith(f"{name} ")]
        shown = line.split()[1]
        value = float(shown[:-1].replace(",", "")) * (1e9 if shown.endswith("B") else 1e6)
        assert abs(value - total) / total < 0.01, (name, shown, total)


def test_wheel_install_resolves_config_names_from_another_directory(tmp_path):
    # The wheel is built from a copy of the sources so the checkout gets no build/ directory.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "engram_jax", source / "engram_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")]
    subprocess.run([*build, str(source)], check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("engram_jax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"engram_jax/configs/{n}.py" for n in configs.config_names()} <= names
    assert "engram_jax/assets/python_docs_slice.txt.gz" in names

    site = tmp_path / "site"
    install = [*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, timeout=300, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the installed copy is importable: no checkout on the path, cwd outside the repository.
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    listing = run("-m", "engram_jax.configs")
    assert listing.returncode == 0, listing.stderr
    assert "tiny" in listing.stdout and "engram_27b" in listing.stdout
    located = run("-c", "import engram_jax; print(engram_jax.__file__)")
    assert located.stdout.startswith(str(site)), located.stdout
    # The trainer loads the named config and parses an override; the invalid value stops it
    # at validation, before any data or model is built.
    trained = run(
        "-m",
        "engram_jax.train",
        "--config=tiny",
        f"--workdir={tmp_path / 'w'}",
        "--config.num_train_steps=0",
    )
    assert trained.returncode != 0
    assert "config.num_train_steps: got 0" in trained.stderr, trained.stderr[-2000:]
    unknown = run("-m", "engram_jax.train", "--config=tinny", f"--workdir={tmp_path / 'w'}")
    assert unknown.returncode == 2 and "one of deepseek_v41, dense_4b" in unknown.stderr
