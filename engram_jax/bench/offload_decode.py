"""Decode tokens/s with the Engram tables on the device, in host RAM, or on disk behind a row cache.

python -m engram_jax.bench.offload_decode       # tiny model, fresh (untrained) weights
python -m engram_jax.bench.offload_decode --workdir=/tmp/engram_tiny --tokens=64
python -m engram_jax.bench.offload_decode --rows_per_head=161600 --engram_layers=1 --demo_width \
    --make_workdir=/tmp/big_table   # a workdir to measure `generate`'s peak RSS per placement

`measure_decode(workdir, placement, tokens)` times one placement. Each placement decodes the same
prompt greedily after one warm-up generation (compiles); the table reports the median of
`--repeats` timed generations, the ratio to device tables, the share of the timed time the step
waited for rows, and, for disk, the cache hit rate. The placement `disk-cold` is `disk` with the
row file evicted from the OS page cache and the row cache emptied before every generation, so
every row comes from the storage device (`RowFile.evict_page_cache`): the cold-start case, and the
per-row latency the long tail of a table larger than RAM pays. Without `--workdir` a checkpoint of
freshly initialised weights is written first (`make_workdir`); throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import ml_collections
import numpy as np

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import config as config_lib
from engram_jax import generate as generate_lib
from engram_jax import sharding
from engram_jax import train as train_lib
from engram_jax.bench._timing import machine_description, print_table
from engram_jax.tables import row_files

PROMPT = "The memory table maps every suffix n-gram to a row"


def make_workdir(config: ml_collections.ConfigDict, workdir: str, step: int = 0) -> str:
    """Writes a generation-ready workdir (tokenizer + one checkpoint) of freshly initialised
    weights for `config`, without training."""
    cfg = config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    setup = train_lib.build_data(cfg, workdir)
    setup.tokenizer.save(os.path.join(workdir, train_lib.TOKENIZER_FILE))
    mesh = sharding.mesh_from_config(cfg.mesh)
    model = train_lib.Transformer(cfg.model, lookup_fn=sharding.table_lookup_fn(mesh))
    txs = train_lib.make_optimizers(cfg)[:2]
    state, _ = train_lib.create_train_state(model, cfg, txs, mesh)
    dense, memory = train_lib.checkpoint_items(state)
    with checkpoint_lib.CheckpointStore(os.path.join(workdir, "checkpoints")) as store:
        store.save(
            step,
            state=dense,
            memory=memory,
            metadata=train_lib._checkpoint_metadata(config, setup),
        )
    return workdir


def measure_decode(
    workdir_or_generator: str | generate_lib.Generator,
    placement: str = "device",
    tokens: int = 32,
    *,
    repeats: int = 3,
    row_cache_mib: float = 256.0,
    before_each: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Greedy decode with the tables at `placement` ("device", "host" or "disk"): one warm-up
    generation, then `repeats` timed generations of `tokens` tokens. Returns `{"tokens_per_s":
    median rate, "wait": share of the timed time the step waited for rows (0 for device)}`.
    `before_each` runs before every generation, untimed (e.g. to evict the row file)."""
    generator = workdir_or_generator
    if isinstance(generator, str):
        with generate_lib.Generator(
            generator, table_placement=placement, row_cache_mib=row_cache_mib
        ) as opened:
            return measure_decode(
                opened, placement, tokens, repeats=repeats, before_each=before_each
            )
    sampling = generate_lib.SamplingConfig(max_tokens=tokens, temperature=0.0)
    prompt = np.asarray(generator.tokenizer.encode(PROMPT).ids, np.int32)
    if before_each is not None:
        before_each()
    generator.generate_ids(prompt, sampling)  # compiles prefill and step
    if generator.rows is not None:
        generator.step.wait_seconds = 0.0
    rates, seconds = [], 0.0
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        start = time.perf_counter()
        produced = generator.generate_ids(prompt, sampling)
        elapsed = time.perf_counter() - start
        seconds += elapsed
        # An early eos still counts the step that produced it.
        rates.append((len(produced) + 1) / elapsed)
    wait = generator.step.wait_seconds / seconds if generator.rows is not None else 0.0
    return {"tokens_per_s": statistics.median(rates), "wait": wait}


def _tiny_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """configs/tiny.py with `--rows_per_head` table rows per head."""
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    spec = importlib.util.spec_from_file_location("tiny_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.engram.table_rows_per_head = (args.rows_per_head, args.rows_per_head)
    config.model.engram.layer_ids = tuple(int(i) for i in args.engram_layers.split(","))
    if args.demo_width:
        # The demo's layer shape: 8 heads per order, rows of 64 (512 per order).
        config.model.engram.heads_per_ngram = 8
        config.model.engram.embed_per_ngram = 512
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="", help="trained workdir; '' writes a fresh one")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per timed generation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--row_cache_mib", type=float, default=256.0)
    parser.add_argument(
        "--rows_per_head", type=int, default=10007, help="tiny config's table rows per head"
    )
    parser.add_argument(
        "--engram_layers", default="1,3", help="tiny config's Engram layer ids (comma-separated)"
    )
    parser.add_argument(
        "--demo_width", action="store_true", help="8 heads per order of 64-wide rows (the demo's)"
    )
    parser.add_argument(
        "--placements", default="device,host,disk,disk-cold", help="comma-separated; see above"
    )
    parser.add_argument(
        "--make_workdir", default="", help="only write a fresh workdir at this path and exit"
    )
    args = parser.parse_args(argv)
    if args.make_workdir:
        make_workdir(_tiny_config(args), args.make_workdir)
        return
    workdir = args.workdir
    if not workdir:
        workdir = make_workdir(_tiny_config(args), tempfile.mkdtemp(prefix="offload_decode_"))
    print(f"# offload decode, {datetime.date.today()}, {machine_description()}")
    print(f"# workdir {workdir}; {args.tokens} tokens x {args.repeats} repeats, greedy")
    rows, device_rate = [], None
    for placement in args.placements.split(","):
        cold = placement == "disk-cold"
        generator = generate_lib.Generator(
            workdir,
            table_placement="disk" if cold else placement,
            row_cache_mib=args.row_cache_mib,
        )
        before_each = functools.partial(_evict, generator.rows) if cold else None
        start = time.perf_counter()
        timing = measure_decode(
            generator, placement, args.tokens, repeats=args.repeats, before_each=before_each
        )
        rate = timing["tokens_per_s"]
        device_rate = device_rate or rate
        row = {"placement": placement, "tokens/s": rate, "vs device": rate / device_rate}
        if generator.rows is not None:
            row["wait"] = timing["wait"]
            cache = generator.rows.cache
            if cache.capacity_bytes:
                row["cache hit rate"] = cache.hits / cache.requested
        rows.append(row)
        generator.close()
        print(f"# {placement}: {time.perf_counter() - start:.0f} s", flush=True)
    print_table(rows, ["placement", "tokens/s", "vs device", "wait", "cache hit rate"])


def _evict(rows: row_files.RowGatherer) -> None:
    """Empties the row cache and drops the row files from the OS page cache."""
    rows.cache.clear()
    for source in rows.cache.sources:
        source.evict_page_cache()


if __name__ == "__main__":
    from engram_jax import cli

    cli.call(lambda: main(sys.argv[1:]))
