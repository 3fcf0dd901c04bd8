"""Peak RSS of building, saving, restoring and converting one Engram table, each phase in a fresh
process, as a multiple of the table's bytes.

python -m engram_jax.bench.table_memory      # the demo-sized layer: 10.3M rows x 64 f32
python -m engram_jax.bench.table_memory --rows_per_head=64661 --baseline

Phases (each a subprocess reading its own peak RSS, VmHWM, after jax is imported and warm):
- `init`: `initializers.init_table` (what the trainer calls per table), row chunks per shard;
- `save`: `init` then `CheckpointStore.save` of the `memory` item (row-block writes);
- `restore`: `CheckpointStore.restore(items=("memory",))` onto a one-device target;
- `host`: the table into host RAM for `generate --table_placement=host` (block reads);
- `convert`: the checkpoint table into the disk tier's flat row file (block reads);
- `baseline` (with `--baseline`): one `jax.random.normal` over the whole table, i.e. the flax
  initializer of the Engram module (~4x the table: budget the memory before running it).
The table holds `2 orders x --heads primes near --rows_per_head` rows (the demo's 646400-based
primes by default) of `--width` float32.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

PHASES = ("init", "save", "restore", "host", "convert")


def _peak_rss_bytes() -> int:
    """VmHWM of this process (peak resident set), in bytes."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _table_shape(args: argparse.Namespace) -> tuple[int, int]:
    from engram_jax.hashing import table_primes

    primes = table_primes((args.rows_per_head,) * 2, args.heads, (1,))[1]
    return int(sum(primes)), args.width


def _run_phase(args: argparse.Namespace) -> dict:
    """Runs one phase in this process; returns its numbers."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from engram_jax import checkpoint as checkpoint_lib
    from engram_jax.tables import initializers, row_files

    shape = _table_shape(args)
    key = jax.random.PRNGKey(0)
    ckpt_dir = os.path.join(args.dir, "checkpoints")
    path = ("layer_1", "engram", "table")
    # Warm the runtime (backend, a compile) so the baseline excludes one-off start-up memory.
    initializers.init_table(key, (8, shape[1])).block_until_ready()
    base = _peak_rss_bytes()
    start = time.perf_counter()
    if args.phase == "baseline":
        jax.jit(lambda k: jax.random.normal(k, shape))(key).block_until_ready()
    elif args.phase in ("init", "save"):
        table = initializers.init_table(key, shape)
        table.block_until_ready()
        if args.phase == "save":
            with checkpoint_lib.CheckpointStore(ckpt_dir) as store:
                tables = {"layer_1": {"engram": {"table": table}}}
                store.save(1, state={"step": np.int32(1)}, memory={"tables": tables}, metadata={})
    elif args.phase == "restore":
        target = jax.ShapeDtypeStruct(shape, jnp.float32)
        with checkpoint_lib.CheckpointStore(ckpt_dir, create=False) as store:
            memory = store.restore(
                1,
                abstract_memory={"tables": {"layer_1": {"engram": {"table": target}}}},
                items=("memory",),
            )["memory"]
        jax.block_until_ready(memory)
    elif args.phase in ("host", "convert"):
        array = row_files.open_checkpoint_table(os.path.join(ckpt_dir, "1", "memory"), path)
        if args.phase == "host":
            row_files.load_host_table(array)
        else:
            row_files.write_row_file(array, args.dir, "layer_1", step=1, source="bench")
    seconds = time.perf_counter() - start
    return {"phase": args.phase, "peak": _peak_rss_bytes(), "base": base, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows_per_head", type=int, default=646400)
    parser.add_argument("--heads", type=int, default=8, help="hash heads per n-gram order")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--baseline", action="store_true", help="also time the whole-table normal")
    parser.add_argument("--phase", default="", help=argparse.SUPPRESS)
    parser.add_argument("--dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(_run_phase(args)))
        return

    from engram_jax.bench._timing import machine_description, print_table

    rows, width = _table_shape(args)
    table_bytes = rows * width * 4
    workdir = tempfile.mkdtemp(prefix="table_memory_")
    print(f"# table memory, {datetime.date.today()}, {machine_description()}")
    print(f"# table [{rows}, {width}] float32 = {table_bytes / 2**30:.3f} GiB; {workdir}")
    results = []
    phases = PHASES + (("baseline",) if args.baseline else ())
    try:
        for phase in phases:
            command = [
                sys.executable,
                "-m",
                "engram_jax.bench.table_memory",
                f"--rows_per_head={args.rows_per_head}",
                f"--heads={args.heads}",
                f"--width={args.width}",
                f"--phase={phase}",
                f"--dir={workdir}",
            ]
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"phase {phase} failed:\n{out.stderr[-4000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(
                {
                    "phase": phase,
                    "peak RSS GiB": r["peak"] / 2**30,
                    "peak / table": r["peak"] / table_bytes,
                    "(peak - runtime) / table": (r["peak"] - r["base"]) / table_bytes,
                    "runtime GiB": r["base"] / 2**30,
                    "seconds": r["seconds"],
                }
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(
        results,
        [
            "phase",
            "peak RSS GiB",
            "peak / table",
            "(peak - runtime) / table",
            "runtime GiB",
            "seconds",
        ],
    )


if __name__ == "__main__":
    from engram_jax import cli

    cli.call(lambda: main(sys.argv[1:]))
