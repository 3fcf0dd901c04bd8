"""Sharded Engram lookup and training step on 1, 2, 4 and 8 simulated CPU devices.

python -m engram_jax.bench.sharding [--devices=1,2,4,8 --rows=262144 --width=64 --ids=65536
    --repeats=3 --steps=3]

For each device count a subprocess starts with XLA_FLAGS=--xla_force_host_platform_device_count=n
(the flag is read when jax starts) and measures, on a mesh (data=1, model=n):

  * lookup (forward + gradient of the summed squares of the gathered rows) of `--ids` ids
    from a [rows, width] float32 table, three ways: `replicated` (the table on every device,
    `jnp.take`), `sharded take` (the table's rows split over `model`, `jnp.take` left to XLA's
    partitioner) and `vocab-parallel` (`sharding.vocab_parallel_lookup`: local masked gather +
    psum in `shard_map`). Reported: rows/s, and from the compiled program the collectives XLA
    inserted and the bytes their results hold (what crosses the interconnect on a TPU).
  * one training step of a small Engram + MoE + mHC model through `engram_jax.train` (mesh
    data=n/f x fsdp=f with f=2 from 2 devices, so the tables are row-sharded and the lookup is
    vocab-parallel): median seconds per step after compilation.

Simulated devices share this machine's cores: wall times grow with n from thread contention and
are not a scaling measurement; the collective counts and bytes are properties of the compiled
programs and carry over to TPU meshes of the same shape.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap

_CHILD = r"""
import json, re, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from engram_jax import sharding
from engram_jax.bench._timing import time_call

rows, width, num_ids, repeats, steps = (int(a) for a in sys.argv[1:6])
n = jax.device_count()
mesh = sharding.make_mesh((1, n), ("data", "model"))
rng = np.random.default_rng(0)
table = rng.standard_normal((rows, width), dtype=np.float32)
ids = rng.integers(0, rows, size=(num_ids,)).astype(np.int32)
ids_dev = jax.device_put(ids, NamedSharding(mesh, P()))
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"f32": 4, "s32": 4, "bf16": 2, "f16": 2, "pred": 1, "u32": 4, "s8": 1}

def collectives(text):
    count, total = 0, 0
    for line in text.splitlines():
        m = re.search(r"= (\w+)\[([\d,]*)\][^ ]* (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if m:
            count += 1
            dims = [int(d) for d in m.group(2).split(",") if d]
            total += _BYTES.get(m.group(1), 4) * int(np.prod(dims))
    return count, total

vp = sharding.vocab_parallel_lookup(mesh, "model")
variants = {
    "replicated": (P(), lambda t, i: jnp.take(t, i, axis=0)),
    "sharded take": (P("model", None), lambda t, i: jnp.take(t, i, axis=0)),
    "vocab-parallel": (P("model", None), vp),
}
out = {"devices": n, "lookup": []}
for name, (spec, lookup) in variants.items():
    t = jax.device_put(table, NamedSharding(mesh, spec))
    with jax.set_mesh(mesh):
        # A loss that needs the gathered rows (the gradient of a plain sum would not).
        fn = jax.jit(jax.value_and_grad(lambda t, i: jnp.sum(jnp.square(lookup(t, i)))))
        compiled = fn.lower(t, ids_dev).compile()
        seconds = time_call(lambda: compiled(t, ids_dev), warmup=1, repeats=repeats)
    count, nbytes = collectives(compiled.as_text())
    out["lookup"].append({"variant": name, "rows/s": num_ids / seconds, "collectives": count,
                          "collective MiB": nbytes / 2**20})

sys.path.insert(0, sys.argv[6])
from test_train import _small_config, _write_corpus
from engram_jax import train
import tempfile, os
work = tempfile.mkdtemp()
_write_corpus(os.path.join(work, "corpus.txt"))
config = _small_config(os.path.join(work, "corpus.txt"))
fsdp = 2 if n >= 2 else 1
config.mesh.data, config.mesh.fsdp, config.mesh.tensor = n // fsdp, fsdp, 1
config.batch_size, config.seq_len = 8, 128
config.num_train_steps, config.eval_every, config.checkpoint_every = steps + 2, 0, 0
config.log_every = 1
train.train_and_evaluate(config, os.path.join(work, "run"))
from engram_jax import metrics
rows_ = [r for r in metrics.read_metrics(os.path.join(work, "run", "metrics.jsonl"))
         if "tokens_per_second" in r][2:]
tps = statistics.median(r["tokens_per_second"] for r in rows_)
out["step_seconds"] = config.batch_size * config.seq_len / tps
out["mesh"] = f"data={n // fsdp} fsdp={fsdp}"
print(json.dumps(out))
"""


def _run(devices: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    tests_dir = os.path.join(os.path.dirname(__file__), "..", "..", "tests")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CHILD)]
        + [str(v) for v in (args.rows, args.width, args.ids, args.repeats, args.steps)]
        + [os.path.abspath(tests_dir)],
        capture_output=True,
        text=True,
        env=env,
    )
    if result.returncode:
        raise RuntimeError(f"{devices} devices failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--rows", type=int, default=262144)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--ids", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    args = parser.parse_args(argv)

    from engram_jax.bench._timing import machine_description, print_table

    results = [_run(int(n), args) for n in args.devices.split(",")]
    print(f"# {re.sub(r'; jax.*', '', machine_description())}; load {os.getloadavg()[0]:.1f}")
    print(f"# lookup fwd+bwd: table [{args.rows}, {args.width}] float32, {args.ids} ids")
    rows = []
    for result in results:
        base = result["lookup"][0]["rows/s"]
        for entry in result["lookup"]:
            rows.append(
                {"devices": result["devices"], **entry, "vs replicated": entry["rows/s"] / base}
            )
    print_table(
        rows, ["devices", "variant", "rows/s", "vs replicated", "collectives", "collective MiB"]
    )
    print("# training step (tests' small Engram+MoE+mHC model, batch 8 x 128)")
    steps = [
        {
            "devices": r["devices"],
            "mesh": r["mesh"],
            "step s": r["step_seconds"],
            "vs 1 device": r["step_seconds"] / results[0]["step_seconds"],
        }
        for r in results
    ]
    print_table(steps, ["devices", "mesh", "step s", "vs 1 device"])


if __name__ == "__main__":
    from engram_jax import cli

    cli.call(main)
