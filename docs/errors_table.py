"""Writes docs/errors.md: every bad input the test suite tries and the message it gets.

    python docs/errors_table.py > docs/errors.md

Runs the tests that contain `pytest.raises` with a pytest plugin that records each exception a
`pytest.raises` block catches (the test, the statement inside the block, the exception's type and
text), then adds the warnings and command-line messages that tests check through logs or stderr.
Nothing is typed by hand: rerun it after changing a message.
"""

from __future__ import annotations

import inspect
import linecache
import logging
import os
import re
import subprocess
import sys
import tempfile

import pytest

# pytest's per-test temporary directories, shortened to TMP/ in the table.
_TMP_PATH = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/]+/")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MESSAGE = 400

_records: list[tuple[str, str, str, str]] = []  # (test, statement, exception type, message)
_current_test = [""]


def _statement(filename: str, line: int) -> str:
    """The first statement inside the `with pytest.raises(...)` block that starts at `line`."""
    lines, index = [], line
    # Skip the rest of a multi-line `with` header.
    while not linecache.getline(filename, index).rstrip().endswith(":"):
        index += 1
    body = linecache.getline(filename, index + 1)
    indent = len(body) - len(body.lstrip())
    index += 1
    while True:
        text = linecache.getline(filename, index)
        if not text.strip() or (len(text) - len(text.lstrip()) < indent and lines):
            break
        lines.append(text.strip())
        if text.rstrip().endswith((")", "]")) and text.count("(") <= text.count(")"):
            break
        index += 1
    return " ".join(lines)


class _Recording:
    def __init__(self, inner, filename: str, line: int):
        self._inner, self._where = inner, (filename, line)

    def __enter__(self):
        return self._inner.__enter__()

    def __exit__(self, exc_type, exc, tb):
        if exc is not None:
            _records.append(
                (_current_test[0], _statement(*self._where), exc_type.__name__, str(exc))
            )
        return self._inner.__exit__(exc_type, exc, tb)


class _Plugin:
    def __init__(self):
        self._raises = pytest.raises

        def raises(*args, **kwargs):
            if len(args) > 1:  # the function form, pytest.raises(E, func, ...)
                return self._raises(*args, **kwargs)
            caller = sys._getframe(1)
            return _Recording(
                self._raises(*args, **kwargs), caller.f_code.co_filename, caller.f_lineno
            )

        pytest.raises = raises

    def pytest_collection_modifyitems(self, items):
        keep = []
        for item in items:
            function = getattr(item, "function", None)
            if function is not None and "pytest.raises" in inspect.getsource(function):
                keep.append(item)
        items[:] = keep

    def pytest_runtest_call(self, item):
        _current_test[0] = item.nodeid


class _WarningRecorder(logging.Handler):
    """The package's warnings during those tests (e.g. a prompt cut to the trained context)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        row = (_current_test[0], f"(logged by {record.name})", "warning", record.getMessage())
        if row not in _records:
            _records.append(row)


def _extra_rows() -> list[tuple[str, str, str, str]]:
    """Messages the tests check in logs or a child's stderr rather than as exceptions."""
    sys.path.insert(0, ROOT)
    from tokenizers import Tokenizer, models, pre_tokenizers

    from engram_jax import data, preemption

    rows = []
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("engram_jax.data").addHandler(handler)
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    data.make_data_spec(tokenizer)
    for record in records:
        if record.levelno >= logging.WARNING:
            rows.append(
                (
                    "tests/test_data.py::test_missing_specials_warn_and_name_the_config_keys",
                    "data.make_data_spec(tokenizer_without_pad_or_eos)",
                    "warning",
                    record.getMessage(),
                )
            )
    for signum, step in ((15, 2), (2, 4)):
        rows.append(
            (
                "tests/test_train.py::test_sigterm_and_sigint_save_the_current_step_and_resume_"
                "exactly",
                f"signal {signum} to python -m engram_jax.train after step {step}",
                f"exit {128 + signum}, log line",
                str(preemption.TrainingStopped(signum, step, "WORKDIR/checkpoints/" + str(step))),
            )
        )
    rows.append(
        (
            "tests/test_preemption.py::test_second_signal_exits_at_once",
            "a second SIGINT while stopping",
            "exit 130, stderr",
            "SIGINT again: exiting now without saving; the last committed checkpoint is kept",
        )
    )
    override = subprocess.run(
        [
            sys.executable,
            "-m",
            "engram_jax.train",
            f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
            "--workdir=/tmp/unused",
            "--config.model.num_layerz=3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    last = [line for line in override.stderr.splitlines() if "num_layerz" in line][-1:]
    rows.append(
        (
            "tests/test_train.py::test_unknown_config_key_fails_at_parse_time",
            "--config.model.num_layerz=3",
            f"exit {override.returncode}, stderr",
            last[0] if last else override.stderr[-300:],
        )
    )
    generate = subprocess.run(
        [
            sys.executable,
            "-m",
            "engram_jax.generate",
            "--workdir=/tmp/unused",
            "--prompt=hello",
            "--max_tokens=-3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    last = [line for line in generate.stderr.splitlines() if "--max_tokens" in line][-1:]
    rows.append(
        (
            "tests/test_generate.py::test_command_line_refuses_negative_max_tokens",
            "python -m engram_jax.generate ... --max_tokens=-3",
            f"exit {generate.returncode}, stderr",
            last[0] if last else generate.stderr[-300:],
        )
    )
    with tempfile.TemporaryDirectory() as folder:
        bad_config = os.path.join(folder, "BAD.py")
        with open(bad_config, "w", encoding="utf-8") as f:
            f.write("def get_config():\n    return None\n")
        loaded = subprocess.run(
            [
                sys.executable,
                "-m",
                "engram_jax.train",
                f"--config={bad_config}",
                f"--workdir={folder}",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
        )
    rows.append(
        (
            "tests/test_cli.py::test_config_file_that_does_not_load_is_one_line",
            "python -m engram_jax.train --config=BAD.py (get_config() returns None)",
            f"exit {loaded.returncode}, stderr",
            loaded.stderr.strip().replace(folder + "/", "")[-MAX_MESSAGE:],
        )
    )
    return rows


def _cell(text: str) -> str:
    text = _TMP_PATH.sub("TMP/", " ".join(text.split()))
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    return text.replace("|", "\\|")


def main() -> None:
    extra = _extra_rows()
    plugin = _Plugin()
    package_logger = logging.getLogger("engram_jax")
    package_logger.addHandler(_WarningRecorder())
    package_logger.setLevel(logging.INFO)
    code = pytest.main(
        ["-q", "-p", "no:cacheprovider", "-o", "addopts=", os.path.join(ROOT, "tests")],
        plugins=[plugin],
    )
    if code not in (0, 5):
        raise SystemExit(f"the tests failed (pytest exit code {code}); the table would be partial")
    rows = _records + extra
    out = [
        "# Bad inputs and their messages",
        "",
        "Every bad input the test suite tries, with the message it gets, produced by running the",
        "tests (`python docs/errors_table.py > docs/errors.md`; messages longer than "
        f"{MAX_MESSAGE} characters are cut).",
        "",
        "| Test | Bad input | Error | Message |",
        "|---|---|---|---|",
    ]
    for test, statement, kind, message in rows:
        test = test.replace("tests/", "", 1)
        out.append(f"| `{_cell(test)}` | `{_cell(statement)}` | {kind} | {_cell(message)} |")
    sys.stdout = sys.__stdout__
    print("\n".join(out))


if __name__ == "__main__":
    # pytest's own output goes to stderr so that stdout is the table alone.
    sys.stdout = sys.stderr
    main()
