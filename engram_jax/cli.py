"""What every `python -m engram_jax.<tool>` does with an error: one line, no traceback.

A bad input (a config value, a config file that does not load, a checkpoint that does not fit,
a data or tokenizer path, a locked workdir, a sampling setting) ends the program with one line on
stderr, `<tool>: error: <Type>: <message>`, and exit status 1 (2 for a config file that does
not load). The message names the input and what was expected. The traceback is printed only
when asked: `ENGRAM_JAX_TRACEBACK=1` in the environment, or `--traceback` on the command line
(removed before the tool parses its flags). Errors that are not about the input (a bug, an
accelerator failure) keep Python's traceback.

`run(main)` wraps an absl program (`app.run`); `call(main)` wraps one that parses its own
arguments (the benchmarks' argparse). `load_config_file` loads a `--config` file and names the
file and the cause when it does not load (syntax error, no `get_config`, `get_config` raising
or returning something other than a config); `describe_path` says what a path that is not a
regular file is (directory, FIFO, device, symlink loop) without opening it.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

TRACEBACK_ENV = "ENGRAM_JAX_TRACEBACK"
TRACEBACK_FLAG = "--traceback"
CONFIG_FILE_EXIT_CODE = 2


def traceback_requested() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _strip_traceback_flag(argv: Sequence[str]) -> list[str]:
    """argv without `--traceback`, which then sets `ENGRAM_JAX_TRACEBACK=1` for this process."""
    out = [a for a in argv if a != TRACEBACK_FLAG]
    if len(out) != len(argv):
        os.environ[TRACEBACK_ENV] = "1"
    return out


def is_input_error(error: BaseException) -> bool:
    """Errors about what the user gave: the project's own exception types (ConfigError,
    CheckpointMismatchError, WorkdirLockedError, ...), ValueError (data, sampling, ranges) and
    OSError (FileNotFoundError and the other path errors, which name the path)."""
    if isinstance(error, (ValueError, OSError, MemoryError)):
        return True
    return any(cls.__module__.startswith("engram_jax") for cls in type(error).__mro__)


def one_line(error: BaseException) -> str:
    """`<Type>: <message>` with the message's lines joined by '; '."""
    message = ""
    for line in (line.strip() for line in str(error).splitlines()):
        if line:
            message += ("" if not message else " " if message.endswith(":") else "; ") + line
    message = message or repr(error)
    return f"{type(error).__name__}: {message}"


def _tool_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None) or os.path.basename(sys.argv[0] or "engram_jax")
    return name.removesuffix(".__main__")


def _let_checkpoint_threads_finish(timeout_s: float = 30.0) -> None:
    """Joins orbax's background threads (a checkpoint store's cleanup or save): left running
    into interpreter shutdown they print a traceback of their own ("cannot schedule new
    futures after interpreter shutdown") under the one line."""
    import threading
    import time

    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax"):
            thread.join(max(0.0, deadline - time.monotonic()))


def exit_with(error: BaseException, code: int = 1) -> None:
    """Prints `error` as one line (plus where to get the traceback) and exits with `code`."""
    _let_checkpoint_threads_finish()
    print(
        f"{_tool_name()}: error: {one_line(error)} "
        f"[{TRACEBACK_ENV}=1 or {TRACEBACK_FLAG} shows the traceback]",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(code)


def guarded(main: Callable[..., Any]) -> Callable[..., Any]:
    """`main` whose input errors end the process as one line (see the module docstring)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except Exception as error:
            if traceback_requested() or not is_input_error(error):
                raise
            exit_with(error)

    wrapper.__name__ = getattr(main, "__name__", "main")
    wrapper.__doc__ = main.__doc__
    return wrapper


def load_config_file(path: str):
    """`engram_jax.config.load_config_file(path)`, with every way it can fail named.

    Raises:
      ConfigError: the file does not exist or is not a regular file, does not compile, defines
        no `get_config`, sets an undeclared key, or `get_config` raises or returns something
        other than a ConfigDict; the message names the file (and the line in it, when the error
        has one) and the cause.
    """
    import ml_collections

    from engram_jax import config as config_lib

    if not os.path.isfile(path):
        raise config_lib.ConfigError(
            f"config file {path!r}: {describe_path(path)}; expected a Python file defining "
            "get_config(), or the name of a shipped config"
        )
    try:
        config = config_lib.load_config_file(path)
    except config_lib.ConfigError:
        raise
    except SyntaxError as e:
        raise config_lib.ConfigError(
            f"config file {path!r} line {e.lineno}: syntax error ({e.msg}); fix the file"
        ) from e
    except Exception as e:
        line, function = _where_in(path, e)
        raise config_lib.ConfigError(
            f"config file {path!r}{line}: "
            f"{'get_config()' if function == 'get_config' else 'loading it'} raised {one_line(e)}"
        ) from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise config_lib.ConfigError(
            f"config file {path!r}: get_config() returned {type(config).__name__}; expected "
            "the ConfigDict of engram_jax.config.base_config() with values set"
            + (" (a missing return statement?)" if config is None else "")
        )
    return config


def _where_in(path: str, error: BaseException) -> tuple[str, str | None]:
    """(' line N', function) of the innermost traceback frame in `path`, or ('', None)."""
    target = os.path.abspath(path)
    line, function = "", None
    for frame in traceback.extract_tb(error.__traceback__):
        if os.path.abspath(frame.filename) == target:
            line = f" line {frame.lineno}"
            function = function if function == "get_config" else frame.name
    return line, function


def describe_path(path: str) -> str:
    """What a path that is not a regular file is: a directory, a FIFO, a device, a socket, a
    symlink loop, a dangling link or nothing (never opens it, so a FIFO cannot block)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if os.path.islink(path):
            import errno

            if e.errno == errno.ELOOP:
                return "a symbolic link loop"
            return f"a symbolic link to a missing target ({os.readlink(path)!r})"
        return "no such file or directory"
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
    )
    for test, name in kinds:
        if test(mode):
            return name
    return "not a regular file"


def check_config_flag(argv: Sequence[str], flag: str = "config") -> None:
    """Loads the `--<flag>` file named in `argv` (if any) and exits with one line when it does
    not load, before absl's config-file flag would print a traceback."""
    value = None
    for i, arg in enumerate(argv):
        for prefix in (f"--{flag}=", f"-{flag}="):
            if arg.startswith(prefix):
                value = arg[len(prefix) :]
        if arg in (f"--{flag}", f"-{flag}") and i + 1 < len(argv):
            value = argv[i + 1]
    if not value or (":" in value and not os.path.exists(value)):
        return  # `path:arguments` is left to absl's config flag, which passes the arguments
    try:
        load_config_file(value)
    except Exception as error:
        if traceback_requested():
            raise
        exit_with(error, CONFIG_FILE_EXIT_CODE)


def run(
    main: Callable[[list[str]], Any],
    *,
    argv: Sequence[str] | None = None,
    config_flag: str | None = None,
) -> None:
    """`absl.app.run(main)` with one-line errors; `config_flag` names a config-file flag whose
    value (a shipped config name or a path) is resolved and checked before absl parses it."""
    from absl import app

    argv = _strip_traceback_flag(sys.argv if argv is None else argv)
    if config_flag is not None:
        from engram_jax.configs import resolve_argv

        argv = resolve_argv(argv, config_flag)
        check_config_flag(argv, config_flag)
    app.run(guarded(main), argv=argv)


def call(main: Callable[..., Any], *args: Any) -> Any:
    """`main(*args)` with one-line errors, for programs that parse `sys.argv` themselves."""
    sys.argv = _strip_traceback_flag(sys.argv)
    return guarded(main)(*args)
