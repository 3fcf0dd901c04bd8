"""`python -m engram_jax.preflight --config=... --workdir=... [overrides]`: can this host train?

Run on every worker before a pod launch (launch/tpu_pod.sh does): the config validates, the
workdir (a path or a URL) can be created and written, the data path lists at least one corpus
file, and a given tokenizer file exists, the memory estimate of one training step fits
(engram_jax/memory_estimate.py). With `--require_checkpoint` (a resume) the workdir must
also hold a checkpoint. Prints `ENGRAM_JAX_PREFLIGHT_OK <summary>` and exits 0, or names the
first problem and exits 1. Takes the trainer's flags, so the same command line works for both.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid


def check(config, workdir: str, *, require_checkpoint: bool = False) -> str:
    """Raises (naming the path) when the host cannot run `config` in `workdir`; else a summary."""
    from etils import epath

    from engram_jax import config as config_lib
    from engram_jax import corpus as corpus_lib
    from engram_jax import data as data_lib
    from engram_jax import memory_estimate

    cfg = config_lib.validate(config)
    memory_estimate.check_train_step(cfg)
    root = epath.Path(workdir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".preflight-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # any filesystem or storage client error: name the path and the cause
        raise OSError(f"workdir={workdir!r}: not writable from this host ({e})") from e
    files = corpus_lib.list_files(cfg.train.data_path)
    if cfg.train.eval_data_path:
        corpus_lib.list_files(cfg.train.eval_data_path, key="eval_data_path")
    if cfg.train.tokenizer_path:
        data_lib.load_tokenizer(cfg.train.tokenizer_path)
    checkpoints = root / "checkpoints"
    steps = sorted(
        int(p.name)
        for p in (checkpoints.iterdir() if checkpoints.exists() else ())
        if p.name.isdigit()
    )
    if require_checkpoint and not steps:
        raise FileNotFoundError(
            f"workdir={workdir!r}: --resume, but it holds no checkpoint under checkpoints/"
        )
    latest = steps[-1] if steps else "none"
    return f"data_files={len(files)} latest_checkpoint={latest}"


def main(argv: list[str]) -> None:
    from absl import flags

    from engram_jax import cli

    del argv
    values = flags.FLAGS
    try:
        summary = check(values.config, values.workdir, require_checkpoint=values.require_checkpoint)
    except Exception as e:  # reported as one line for the launcher
        if cli.traceback_requested():
            raise
        print(f"ENGRAM_JAX_PREFLIGHT_FAILED {cli.one_line(e)}", flush=True)
        sys.exit(1)
    print(f"ENGRAM_JAX_PREFLIGHT_OK {summary}", flush=True)


if __name__ == "__main__":
    from absl import flags

    from engram_jax import cli, train

    train._define_flags()
    flags.DEFINE_bool("require_checkpoint", False, "Fail unless the workdir holds a checkpoint.")
    cli.run(main, config_flag="config")
