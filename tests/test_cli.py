"""Every command-line tool ends a bad input with one line naming it: no traceback, exit status
nonzero; the traceback comes back with ENGRAM_JAX_TRACEBACK=1 or --traceback.

One bad input per family (config value, config file that does not load, checkpoint, data path,
tokenizer path, locked workdir, sampling) and per tool; each runs the real program in a
subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engram_jax import cli
from engram_jax.workdir_lock import WorkdirLock

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny.py")


def _run(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
    )


def _error_line(result: subprocess.CompletedProcess, *names: str) -> str:
    """The one error line: exit status nonzero, no traceback, the line names every `names`."""
    output = result.stdout + result.stderr
    assert result.returncode not in (0, None), output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "error: " in line or "FAILED" in line]
    assert len(errors) == 1, output
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def bad_config_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("config_files")
    bodies = {
        "syntax": "def get_config(:\n",
        "no_get_config": "VALUE = 1\n",
        "returns_none": "def get_config():\n    pass\n",
        "returns_dict": "def get_config():\n    return {'seq_len': 8}\n",
        "raises": "def get_config():\n    raise RuntimeError('no such preset')\n",
    }
    files = {}
    for name, body in bodies.items():
        files[name] = root / f"{name}.py"
        files[name].write_text(body)
    return files


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("syntax", "line 1: syntax error"),
        pytest.param("no_get_config", "defines no get_config()", marks=pytest.mark.slow),
        pytest.param("returns_none", "returned NoneType", marks=pytest.mark.slow),
        pytest.param("returns_dict", "returned dict", marks=pytest.mark.slow),
        pytest.param(
            "raises",
            "line 2: get_config() raised RuntimeError: no such preset",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_config_file_that_does_not_load_is_one_line(bad_config_files, tmp_path, kind, expected):
    path = str(bad_config_files[kind])
    result = _run("-m", "engram_jax.train", f"--config={path}", f"--workdir={tmp_path}")
    assert result.returncode == cli.CONFIG_FILE_EXIT_CODE
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    _error_line(result, path, expected)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["engram_jax.accounting", "engram_jax.preflight"])
def test_other_config_tools_name_the_config_file(bad_config_files, tmp_path, tool):
    path = str(bad_config_files["raises"])
    result = _run("-m", tool, f"--config={path}", f"--workdir={tmp_path}")
    _error_line(result, path, "get_config() raised RuntimeError: no such preset")


def test_bad_config_value_is_one_line(tmp_path):
    args = ("-m", "engram_jax.train", f"--config={TINY}", f"--workdir={tmp_path}")
    result = _run(*args, "--config.learning_rate=nan")
    line = _error_line(result, "ConfigError", "config.learning_rate: got nan", "finite")
    assert cli.TRACEBACK_ENV in line


@pytest.mark.slow
def test_traceback_on_request(tmp_path):
    args = ("-m", "engram_jax.train", f"--config={TINY}", f"--workdir={tmp_path}")
    for extra_args, env in ((("--traceback",), None), ((), {cli.TRACEBACK_ENV: "1"})):
        shown = _run(*args, "--config.learning_rate=nan", *extra_args, env=env)
        assert shown.returncode != 0
        assert "Traceback" in shown.stderr and "config.learning_rate" in shown.stderr


@pytest.mark.slow
def test_hopeless_memory_is_refused_before_compiling(tmp_path):
    """seq_len=65536 at the tiny config's batch: attention alone needs terabytes."""
    result = _run(
        "-m",
        "engram_jax.train",
        f"--config={TINY}",
        f"--workdir={tmp_path / 'run'}",
        "--config.seq_len=65536",
    )
    _error_line(result, "for one training step", "seq_len", "memory_limit_gib")
    assert not (tmp_path / "run").exists()  # refused before the workdir was made


def test_data_path_device_and_locked_workdir(tmp_path):
    result = _run(
        "-m",
        "engram_jax.train",
        f"--config={TINY}",
        f"--workdir={tmp_path / 'a'}",
        "--config.data_path=/dev/null",
    )
    _error_line(result, "data_path='/dev/null'", "a character device")

    locked = tmp_path / "locked"
    locked.mkdir()
    with WorkdirLock(str(locked)):
        result = _run("-m", "engram_jax.train", f"--config={TINY}", f"--workdir={locked}")
    _error_line(result, "WorkdirLockedError", str(locked))


@pytest.mark.slow
def test_tokenizer_fifo_and_missing_eval_data_name_their_keys(tmp_path):
    fifo = tmp_path / "tokenizer.json"
    os.mkfifo(fifo)
    common = ("-m", "engram_jax.train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}")
    result = _run(*common, f"--config.tokenizer_path={fifo}", timeout=120)  # must not hang
    _error_line(result, f"tokenizer_path='{fifo}'", "FIFO")
    result = _run(*common, f"--config.eval_data_path={tmp_path / 'none.jsonl'}")
    line = _error_line(result, "eval_data_path=", "none.jsonl")
    assert "data_path=" not in line.replace("eval_data_path=", "")


@pytest.mark.slow
def test_generate_sampling_and_checkpoint_errors(tmp_path):
    common = ("-m", "engram_jax.generate", f"--workdir={tmp_path / 'none'}", "--prompt=hi")
    result = _run(*common, "--temperature=nan")
    _error_line(result, "temperature: got nan", "finite")
    result = _run(*common)
    _error_line(result, "FileNotFoundError", str(tmp_path / "none"))


@pytest.mark.slow
def test_plot_preflight_experiment_and_bench_are_one_line(tmp_path, bad_config_files):
    result = _run("-m", "engram_jax.plot", f"--workdir={tmp_path}/a", f"--workdir={tmp_path}/b")
    _error_line(result, "out_dir")
    result = _run(
        "-m",
        "engram_jax.preflight",
        f"--config={TINY}",
        f"--workdir={tmp_path / 'run'}",
        "--config.model.hc.n_streams=1000",
    )
    assert result.stdout.startswith("ENGRAM_JAX_PREFLIGHT_FAILED ConfigError")
    _error_line(result, "config.model.hc.n_streams: got 1000")
    result = _run("-m", "engram_jax.experiments.floors", "--data_path=/dev/null")
    _error_line(result, "data_path='/dev/null'", "a character device")
    bad = str(bad_config_files["syntax"])
    result = _run("-m", "engram_jax.bench.pipeline", f"--config={bad}")
    _error_line(result, bad, "syntax error")


@pytest.mark.slow
def test_resume_with_another_model_and_a_huge_generation_are_one_line(tmp_path):
    """A checkpoint that does not fit the config (CheckpointMismatchError) names the key; a
    generation whose decode cache cannot fit names --max_tokens (the warning past seq_len is
    a log line, not an error)."""
    common = (
        "-m",
        "engram_jax.train",
        f"--config={TINY}",
        f"--workdir={tmp_path}",
        "--config.num_train_steps=1",
        "--config.warmup_steps=0",
        "--config.eval_every=0",
        "--config.tokenizer_train_bytes=200000",
    )
    first = _run(*common, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    result = _run(*common, "--config.model.hidden_size=64", timeout=600)
    _error_line(result, "CheckpointMismatchError", "model.hidden_size: checkpoint 128, config 64")
    generate = ("-m", "engram_jax.generate", f"--workdir={tmp_path}", "--prompt=hello")
    result = _run(*generate, "--max_tokens=1000000000", timeout=600)
    _error_line(result, "max_tokens: got 1000000000", "decode cache", "lower max_tokens")
