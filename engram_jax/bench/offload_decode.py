"""Decode tokens/s with the Engram tables on the device, in host RAM, or on disk behind a row cache.

python -m engram_jax.bench.offload_decode       # tiny model, fresh (untrained) weights
python -m engram_jax.bench.offload_decode --workdir=/tmp/engram_tiny --tokens=64
python -m engram_jax.bench.offload_decode --rows_per_head=161600 --engram_layers=1 --demo_width \
    --make_workdir=/tmp/big_table   # a workdir to measure `generate`'s peak RSS per placement
python -m engram_jax.bench.offload_decode --table_dtype=fp8   # FP8 rows in every placement
python -m engram_jax.bench.offload_decode --table_dtype=fp8 --beyond_ram_gib=30 \
    --placements=device --big_dir=/data/big   # a 30 GiB FP8 disk table, vs the device table

`measure_decode(workdir, placement, tokens)` times one placement. Each placement decodes the same
prompt greedily after one warm-up generation (compiles); the table reports the median of
`--repeats` timed generations, the ratio to device tables, the share of the timed time the step
waited for rows, and, for disk, the cache hit rate. The placement `disk-cold` is `disk` with the
row file evicted from the OS page cache and the row cache emptied before every generation, so
every row comes from the storage device (`RowFile.evict_page_cache`): the cold-start case, and the
per-row latency the long tail of a table larger than RAM pays. Without `--workdir` a checkpoint of
freshly initialised weights is written first (`make_workdir`); throughput does not depend on them.

`--table_dtype=fp8` serves every placement's tables as packed FP8 rows (`generate --table_dtype`;
rows of `--row_width` values, 256 by default for FP8, as released) and ends with the line
`fp8 tables: B bytes per row of W (f32: F); device, host and disk greedy outputs identical: yes`,
computed from the placements' greedy outputs.

`--beyond_ram_gib=G` then also serves the same model (same dense weights, same prompt) from FP8 row
files of G GiB in all, written straight into `--big_dir` (random valid FP8 rows, checksummed; no
checkpoint table: `Generator` serves row files alone when the checkpoint has none), read through a
`--row_cache_mib` cache: placements `big-disk` (warm: repeated generations) and `big-disk-cold`
(page cache and row cache emptied before each generation). The big files are deleted afterwards
unless `--keep_big`.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import config as config_lib
from engram_jax import generate as generate_lib
from engram_jax import sharding
from engram_jax import train as train_lib
from engram_jax.bench._timing import machine_description, print_table
from engram_jax.model import engram_table_sizes
from engram_jax.tables import fp8, row_files

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
    table_dtype: str | None = None,
) -> dict[str, Any]:
    """Greedy decode with the tables at `placement` ("device", "host" or "disk"): one warm-up
    generation, then `repeats` timed generations of `tokens` tokens. Returns `{"tokens_per_s":
    median rate, "wait": share of the timed time the step waited for rows (0 for device),
    "tokens": the last generation's token ids}`.
    `before_each` runs before every generation, untimed (e.g. to evict the row file)."""
    generator = workdir_or_generator
    if isinstance(generator, str):
        with generate_lib.Generator(
            generator,
            table_placement=placement,
            row_cache_mib=row_cache_mib,
            table_dtype=table_dtype,
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
    return {"tokens_per_s": statistics.median(rates), "wait": wait, "tokens": produced}


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
    row_width = args.row_width or (256 if args.table_dtype == "fp8" and not args.demo_width else 0)
    if row_width:
        config.model.engram.embed_per_ngram = config.model.engram.heads_per_ngram * row_width
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
        "--row_width", type=int, default=0,
        help="values per table row (0: the config's; 256 with --table_dtype=fp8)",
    )  # fmt: skip
    parser.add_argument(
        "--table_dtype", default="stored", choices=generate_lib.TABLE_DTYPES,
        help="tables as stored, or packed FP8 rows in every placement (see above)",
    )  # fmt: skip
    parser.add_argument(
        "--placements", default="device,host,disk,disk-cold", help="comma-separated; see above"
    )
    parser.add_argument(
        "--beyond_ram_gib", type=float, default=0.0,
        help="also serve FP8 row files of this many GiB from --big_dir (see above)",
    )  # fmt: skip
    parser.add_argument("--big_dir", default="", help="directory of the big workdir")
    parser.add_argument("--keep_big", action="store_true", help="keep the big row files")
    parser.add_argument(
        "--make_workdir", default="", help="only write a fresh workdir at this path and exit"
    )
    args = parser.parse_args(argv)
    if args.beyond_ram_gib and (args.table_dtype != "fp8" or not args.big_dir):
        parser.error("--beyond_ram_gib: needs --table_dtype=fp8 and a --big_dir")
    if args.make_workdir:
        make_workdir(_tiny_config(args), args.make_workdir)
        return
    workdir = args.workdir
    if not workdir:
        workdir = make_workdir(_tiny_config(args), tempfile.mkdtemp(prefix="offload_decode_"))
    table_dtype = args.table_dtype if args.table_dtype != "stored" else None
    print(f"# offload decode, {datetime.date.today()}, {machine_description()}")
    print(f"# workdir {workdir}; {args.tokens} tokens x {args.repeats} repeats, greedy")
    if table_dtype:
        print(f"# table_dtype={args.table_dtype}")
    runs = [(p, workdir) for p in args.placements.split(",") if p]
    if args.beyond_ram_gib:
        big = make_big_workdir(workdir, args.big_dir, args.beyond_ram_gib, args)
        runs += [("big-disk", big), ("big-disk-cold", big)]
    rows, outputs, device_rate = [], {}, None
    try:
        for placement, path in runs:
            row, outputs[placement] = _measure_placement(placement, path, args, table_dtype)
            device_rate = device_rate or row["tokens/s"]
            row["vs device"] = row["tokens/s"] / device_rate
            rows.append(row)
    finally:
        if args.beyond_ram_gib and not args.keep_big:
            shutil.rmtree(args.big_dir, ignore_errors=True)
    columns = ["placement", "tokens/s", "vs device", "wait", "cache hit rate", "peak RSS GiB"]
    print_table(rows, columns)
    if args.table_dtype == "fp8":
        print(fp8_summary(workdir, outputs))


def _measure_placement(placement: str, path: str, args, table_dtype) -> tuple[dict, list[int]]:
    """Times one placement (`disk-cold`: evicted before each generation; `big-*`: the big
    workdir's row files); returns its table row and its greedy tokens."""
    cold = placement.endswith("disk-cold")
    _reset_peak_rss()
    start = time.perf_counter()
    generator = generate_lib.Generator(
        path,
        table_placement="disk" if placement.endswith(("disk", "disk-cold")) else placement,
        row_cache_mib=args.row_cache_mib,
        table_dtype=table_dtype,
    )
    before_each = functools.partial(_evict, generator.rows) if cold else None
    timing = measure_decode(
        generator, placement, args.tokens, repeats=args.repeats, before_each=before_each
    )
    row = {"placement": placement, "tokens/s": timing["tokens_per_s"]}
    if generator.rows is not None:
        row["wait"] = timing["wait"]
        cache = generator.rows.cache
        if cache.capacity_bytes:
            row["cache hit rate"] = cache.hits / cache.requested
    row["peak RSS GiB"] = _status_bytes("VmHWM") / 2**30
    generator.close()
    print(f"# {placement}: {time.perf_counter() - start:.0f} s", flush=True)
    return row, timing["tokens"]


def fp8_summary(workdir: str, outputs: dict[str, list[int]]) -> str:
    """The closing line of an FP8 run, from the workdir's config and the greedy outputs of the
    device, host and disk placements (every one of them that ran, disk-cold too, must agree)."""
    config = config_lib.from_saved(
        checkpoint_lib.CheckpointStore(
            os.path.join(workdir, "checkpoints"), create=False, cleanup_partial=False
        ).read_metadata(None)["config"]
    )
    width = config_lib.validate(config).model.engram.row_width
    sizes = f"fp8 tables: {fp8.packed_width(width)} bytes per row of {width} (f32: {4 * width})"
    if not all(p in outputs for p in ("device", "host", "disk")):
        return f"# {sizes}; greedy outputs not compared (needs the device, host and disk runs)"
    compared = [outputs[p] for p in ("device", "host", "disk", "disk-cold") if p in outputs]
    same = all(o == compared[0] for o in compared)
    return f"{sizes}; device, host and disk greedy outputs identical: {'yes' if same else 'no'}"


def _reset_peak_rss() -> None:
    """Resets this process's peak RSS (VmHWM) to its current RSS (Linux), so each placement's
    peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
    except OSError:
        pass


def _status_bytes(key: str) -> int:
    """A byte count of /proc/self/status (VmHWM: peak RSS; RssAnon: anonymous resident)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def make_big_workdir(small_workdir: str, big_dir: str, gib: float, args) -> str:
    """A workdir of the small one's model and dense weights whose FP8 tables hold `gib` GiB of
    rows in all, as row files only (the checkpoint has no `memory` item): tables far larger than
    RAM cannot pass through a float checkpoint. Rows are random valid FP8 rows."""
    config = _tiny_config(args)
    e = config.model.engram
    width = e.embed_per_ngram // e.heads_per_ngram
    heads = (e.max_ngram - 1) * e.heads_per_ngram
    rows_per_head = int(gib * 2**30 / fp8.packed_width(width) / heads / len(e.layer_ids))
    e.table_rows_per_head = (rows_per_head,) * (e.max_ngram - 1)
    # The small workdir's tokenizer, so both serve the same token ids.
    config.tokenizer_path = os.path.join(small_workdir, train_lib.TOKENIZER_FILE)
    cfg = config_lib.validate(config)
    os.makedirs(big_dir, exist_ok=True)
    setup = train_lib.build_data(cfg, big_dir)
    setup.tokenizer.save(os.path.join(big_dir, train_lib.TOKENIZER_FILE))
    # The dense state does not depend on the table sizes: the small checkpoint's, restored with
    # the big config's abstract state (evaluated, never allocated).
    model = train_lib.Transformer(cfg.model)
    txs = train_lib.make_optimizers(cfg)[:2]
    abstract = jax.eval_shape(
        lambda rng: nn.meta.unbox(train_lib.init_train_state(model, cfg, txs, rng)),
        jax.random.PRNGKey(0),
    )
    abstract_dense, _ = train_lib.checkpoint_items(abstract)
    with checkpoint_lib.CheckpointStore(
        os.path.join(small_workdir, "checkpoints"), create=False, cleanup_partial=False
    ) as store:
        state = store.restore(None, abstract_state=abstract_dense, items=("state",))["state"]
    with checkpoint_lib.CheckpointStore(os.path.join(big_dir, "checkpoints")) as store:
        store.save(
            0, state=state, memory={}, metadata=train_lib._checkpoint_metadata(config, setup)
        )
    rows_dir = os.path.join(big_dir, generate_lib.ROW_DIR, "0")
    sizes = engram_table_sizes(cfg.model)
    start = time.perf_counter()
    for layer in cfg.model.engram.layer_ids:
        _write_random_fp8_rows(rows_dir, f"layer_{layer}.fp8", sum(sizes[layer]), width)
    total = sum(os.path.getsize(os.path.join(rows_dir, n)) for n in os.listdir(rows_dir))
    print(
        f"# big tables: {total / 2**30:.1f} GiB of FP8 row files in {rows_dir} "
        f"({rows_per_head} rows per head; written in {time.perf_counter() - start:.0f} s); "
        f"row cache {args.row_cache_mib} MiB",
        flush=True,
    )
    return big_dir


def _write_random_fp8_rows(directory: str, name: str, num_rows: int, width: int) -> None:
    """A row file of `num_rows` random packed FP8 rows, written block by block."""
    writer = row_files.RowFileWriter(
        directory,
        name,
        (num_rows, fp8.packed_width(width)),
        np.uint8,
        encoding="fp8",
        row_width=width,
        fingerprint="random",
        step=0,
        source="bench",
    )
    rng = np.random.default_rng(0)
    blocks = [
        fp8.encode(rng.standard_normal((row_files.BLOCK_ROWS, width)).astype(np.float32))
        for _ in range(4)
    ]
    for i, start in enumerate(range(0, num_rows, row_files.BLOCK_ROWS)):
        writer.append(blocks[i % len(blocks)][: min(row_files.BLOCK_ROWS, num_rows - start)])
    writer.commit()


def _evict(rows: row_files.RowGatherer) -> None:
    """Empties the row cache and drops the row files from the OS page cache."""
    rows.cache.clear()
    for source in rows.cache.sources:
        source.evict_page_cache()


if __name__ == "__main__":
    from engram_jax import cli

    cli.call(lambda: main(sys.argv[1:]))
