"""End-to-end training throughput: residual / mHC x without / with Engram, through the real trainer.

python -m engram_jax.bench.train                              # tiny + small_cpu, defaults below
python -m engram_jax.bench.train --configs=tiny --tiny_steps=20   # quicker
python -m engram_jax.bench.train --corpus=/path/docs.txt.gz --corpus_mb=4 --markdown=/tmp/t.md

Each variant runs `engram_jax.train.train_and_evaluate` (data pipeline with host-side hashing,
jitted train step with both optimizers, metrics writer) for a few steps with `log_every=1` and no
periodic evals or checkpoints (the final step is still checkpointed, after the timed steps, into a
throw-away workdir). The first `--discard` steps (compilation, warm-up) are dropped and the median
of the remaining per-step `tokens_per_second` and `mfu` rows of `metrics.jsonl` is reported, with
the ratio to residual-without-Engram of the same config. The fastest timed step ("best") is shown
too: on a machine shared with other jobs it is the less load-sensitive estimate of the uncontended
rate. `load` is the 1-minute load average when the variant finished.

(a) `configs/tiny.py` on the bundled corpus; (b) `configs/small_cpu.py` on `--corpus` (a .txt or
.txt.gz corpus such as the full Python 3.11 documentation; default: the bundled corpus), of which
only the first `--corpus_mb` MB of text (cut at a document boundary) is written to the temp dir and
used.
One BPE tokenizer is trained per (corpus, vocab size) and shared by all variants of that config
(`config.tokenizer_path`), and the workdirs share one tokenizer cache directory, so the Engram
compressed-token table is also built once.

MFU divides by `metrics.peak_flops_per_second()`: on a CPU a float32 matmul rate measured once per
process (noisy on a loaded machine; compare MFU within one run only), on accelerators the
data-sheet bf16 peak.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import logging
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import ml_collections

from engram_jax import accounting, cli
from engram_jax import config as config_lib
from engram_jax import data as data_lib
from engram_jax import metrics as metrics_lib
from engram_jax import train as train_lib
from engram_jax.bench._timing import machine_description, print_table
from engram_jax.configs import CONFIG_DIR

VARIANTS = (
    ("residual", False),
    ("residual", True),
    ("mhc", False),
    ("mhc", True),
)
COLUMNS = [
    "config",
    "variant",
    "params (M)",
    "active (M)",
    "tokens/s",
    "ratio",
    "best tokens/s",
    "best ratio",
    "MFU",
    "final loss",
    "load",
]


def _load_config(configs_dir: pathlib.Path, name: str) -> ml_collections.ConfigDict:
    path = configs_dir / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"--configs: {name!r} has no config file {path}")
    return cli.load_config_file(str(path))


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _slice_corpus(path: str, megabytes: float, out_dir: str) -> tuple[str, str]:
    """(data_path, description): the first `megabytes` MB of text of a .txt/.txt.gz corpus, cut at
    the last document boundary (two blank lines) before the limit; the whole file when <= 0."""
    if megabytes <= 0:
        return path, f"{path} (whole)"
    opener = gzip.open if path.endswith(".gz") else open
    limit = int(megabytes * 1e6)
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read(limit + 1)
    if len(text) > limit:
        cut = text.rfind("\n\n\n", 0, limit)
        text = text[: cut if cut > 0 else limit]
    out = os.path.join(out_dir, "corpus_slice.txt")
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    size = len(text.encode("utf-8")) / 1e6
    return out, f"first {size:.1f} MB of {path}"


def _shared_tokenizer(config: ml_collections.ConfigDict, cache_dir: str) -> tuple[str, float, int]:
    """(tokenizer.json path, seconds, documents): the BPE `train.build_data` would train, once."""
    start = time.perf_counter()
    documents = data_lib.load_documents(config.data_path)
    train_docs, _ = data_lib.split_documents(documents, config.eval_fraction)
    data_lib.load_or_train_tokenizer("", train_docs, config.model.vocab_size, cache_dir=cache_dir)
    key = data_lib.tokenizer_cache_key(train_docs, config.model.vocab_size)
    path = os.path.join(cache_dir, f"bpe-{key}", "tokenizer.json")
    return path, time.perf_counter() - start, len(documents)


def _variant_config(
    base: ml_collections.ConfigDict, hc_kind: str, engram: bool, steps: int, streams: int
) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(base.to_dict())
    c.num_train_steps = steps
    c.warmup_steps = min(c.warmup_steps, max(1, steps // 5))
    c.eval_every = 0
    c.eval_batches = 0  # no evaluation at the final step either
    c.checkpoint_every = 0  # only the final step is saved, after the timed steps
    c.max_to_keep = 1
    c.log_every = 1
    if not engram:
        c.model.engram.layer_ids = ()
    c.model.hc.kind = hc_kind
    c.model.hc.n_streams = 1 if hc_kind == "residual" else streams
    return c


def _variant_name(hc_kind: str, engram: bool, streams: int) -> str:
    name = "residual" if hc_kind == "residual" else f"mHC n={streams}"
    return name + (" + Engram" if engram else "")


def _run_variant(
    config: ml_collections.ConfigDict, root: str, cache_dir: str, discard: int, keep: bool
) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="variant_", dir=root)
    # One tokenizer cache for all variants: the Engram compressed-token table is built once.
    os.symlink(cache_dir, os.path.join(workdir, "tokenizer"))
    start = time.perf_counter()
    train_lib.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    rows = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    timed = [r for r in rows if "tokens_per_second" in r and r["step"] > discard]
    if not timed:
        raise ValueError(
            f"--discard={discard}: no timed steps left of {config.num_train_steps}; "
            "expected fewer discarded steps than steps"
        )
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_second"] for r in timed),
        "best_tokens_per_s": max(r["tokens_per_second"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "final_loss": losses[-1],
        "timed_steps": len(timed),
        "seconds": seconds,
        "load": os.getloadavg()[0],
    }


def _bench_config(
    name: str,
    base: ml_collections.ConfigDict,
    steps: int,
    args: argparse.Namespace,
    root: str,
    cache_dir: str,
) -> list[dict[str, Any]]:
    rows, baseline = [], None
    for hc_kind, engram in VARIANTS:
        config = _variant_config(base, hc_kind, engram, steps, args.streams)
        validated = config_lib.validate(config)
        acc = accounting.account(validated.model, validated.train.seq_len)
        variant = _variant_name(hc_kind, engram, args.streams)
        result = _run_variant(config, root, cache_dir, args.discard, args.keep)
        if baseline is None:
            baseline = result
        print(
            f"  {name} / {variant}: {result['tokens_per_s']:,.0f} tokens/s over "
            f"{result['timed_steps']} steps ({result['seconds']:.0f} s incl. compile)",
            file=sys.stderr,
            flush=True,
        )
        rows.append(
            {
                "config": name,
                "variant": variant,
                "params (M)": f"{acc.total_params / 1e6:.2f}",
                "active (M)": f"{acc.activated_params / 1e6:.2f}",
                "tokens/s": f"{result['tokens_per_s']:,.0f}",
                "ratio": f"{result['tokens_per_s'] / baseline['tokens_per_s']:.2f}x",
                "best tokens/s": f"{result['best_tokens_per_s']:,.0f}",
                "best ratio": f"{result['best_tokens_per_s'] / baseline['best_tokens_per_s']:.2f}x",
                "MFU": f"{100 * result['mfu']:.1f}%",
                "final loss": f"{result['final_loss']:.3f}",
                "load": f"{result['load']:.2f}",
            }
        )
    return rows


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", default="tiny,small_cpu", help="comma-separated config names in --configs_dir"
    )
    parser.add_argument("--configs_dir", default=str(CONFIG_DIR))
    parser.add_argument(
        "--corpus", default="", help="corpus of every config but tiny ('' = the bundled corpus)"
    )
    parser.add_argument(
        "--corpus_mb",
        type=float,
        default=4.0,
        help="use only the first N MB of --corpus text (0 = all of it)",
    )
    parser.add_argument("--tiny_steps", type=int, default=30, help="steps per tiny variant")
    parser.add_argument("--steps", type=int, default=15, help="steps per variant of other configs")
    parser.add_argument(
        "--discard", type=int, default=3, help="first steps dropped (compile + warm-up)"
    )
    parser.add_argument("--streams", type=int, default=4, help="mHC streams n")
    parser.add_argument(
        "--batch_size", type=int, default=0, help="override every config's batch size (0 = keep)"
    )
    parser.add_argument("--workdir", default="", help="root of the variant workdirs (temp if '')")
    parser.add_argument("--keep", action="store_true", help="keep the variant workdirs")
    parser.add_argument("--markdown", default="", help="also write the BENCHMARKS.md section here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    # Orbax and absl log every checkpoint internal at INFO; keep the console to the results.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    configs_dir = pathlib.Path(args.configs_dir)
    root = args.workdir or tempfile.mkdtemp(prefix="engram_bench_train_")
    os.makedirs(root, exist_ok=True)
    load_before = _uptime()
    machine = machine_description()
    peak = metrics_lib.peak_flops_per_second()
    started = time.perf_counter()
    notes, rows = [], []
    try:
        for name in names:
            base = _load_config(configs_dir, name)
            if args.batch_size:
                base.batch_size = args.batch_size
            if name != "tiny" and args.corpus:
                base.data_path, corpus_note = _slice_corpus(args.corpus, args.corpus_mb, root)
            else:
                base.data_path, corpus_note = "", "the bundled corpus"
            cache_dir = os.path.join(root, f"tokenizer_{name}")
            os.makedirs(cache_dir, exist_ok=True)
            base.tokenizer_path, tok_seconds, num_docs = _shared_tokenizer(base, cache_dir)
            steps = args.tiny_steps if name == "tiny" else args.steps
            notes.append(
                f"{name}: {corpus_note}, {num_docs} documents (BPE vocab "
                f"{base.model.vocab_size} trained once in {tok_seconds:.0f} s); "
                f"B={base.batch_size}, T={base.seq_len}, {steps} steps, median of the last "
                f"{steps - args.discard}"
            )
            print(notes[-1], file=sys.stderr, flush=True)
            rows += _bench_config(name, base, steps, args, root, cache_dir)
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - started
    load_after = _uptime()
    command = "python -m engram_jax.bench.train " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [
        f"Machine: {machine}; MFU peak {peak / 1e9:.1f} GFLOP/s (metrics.peak_flops_per_second)",
        f"Load before: {load_before}",
        f"Load after:  {load_after}",
        *notes,
        f"Total wall time {total:.0f} s.",
    ]
    print("\n".join(header))
    print_table(rows, COLUMNS)
    if args.markdown:
        _write_markdown(args.markdown, command.strip(), header, rows)


def _write_markdown(path: str, command: str, header: list[str], rows: list[dict]) -> None:
    lines = [
        "## Training throughput: residual vs mHC, with and without Engram (train_and_evaluate)",
        "",
        f"`{command}` ({datetime.date(2026, 11, 26).isoformat()})",
        "",
        *[f"{line}  " for line in header],
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    from engram_jax import cli

    cli.call(main)
