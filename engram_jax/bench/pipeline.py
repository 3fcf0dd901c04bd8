"""Host input pipeline throughput: tokens/s one host delivers (read, tokenise, pack, Engram-hash)
against the tokens/s per host an accelerator run consumes.

python -m engram_jax.bench.pipeline [--config=configs/engram_27b.py --corpus=PATH --batches=8
    --batch_size=4 --workers=0,2]

The pipeline is the trainer's own (`Corpus.stream` -> `data.make_pipeline`) with the config's
sequence length and Engram hashing (all its Engram layers), on a BPE trained once on a 4 MB
sample of the corpus (the tokenizer's vocabulary size barely changes the cost: hashing works on
ids). Variants: no prefetch; a prefetch thread (the default, `data_prefetch=2`); and grain
worker processes (`data_workers`). Each variant builds a fresh pipeline, discards its first batch
(start-up, worker spawn) and times the next `--batches`.

Consumption: `tokens/s per host = chips_per_host x peak FLOP/s x MFU / train FLOPs per token`
(`engram_jax.accounting`), for the config on TPU hosts of 4 chips at the data-sheet bf16 peak.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

from absl import flags

from engram_jax import accounting, cli
from engram_jax import config as config_lib
from engram_jax import corpus as corpus_lib
from engram_jax import data as data_lib
from engram_jax import train as train_lib
from engram_jax.bench._timing import machine_description, print_table

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "corpora" / "python-3.11-docs.txt.gz"
# bf16 peak FLOP/s per chip (data sheets) and chips per host.
TPU_HOSTS = {"v4": (275e12, 4), "v5p": (459e12, 4), "v6e": (918e12, 4)}


def _time_variant(stream, tokenizer, spec, engram, cfg, batch_size, batches, workers, prefetch):
    iterator = data_lib.make_pipeline(
        stream,
        tokenizer,
        spec,
        seq_len=cfg.train.seq_len,
        batch_size=batch_size,
        seed=0,
        engram=engram,
        worker_count=workers,
        prefetch=prefetch,
    )
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    if workers:
        iterator.close()
    return batches * batch_size * cfg.train.seq_len / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "engram_27b.py"))
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS) if DEFAULT_CORPUS.exists() else "")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per variant")
    parser.add_argument("--batch_size", type=int, default=4, help="rows per host batch")
    parser.add_argument("--workers", default="0,2", help="grain worker counts to run")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for consumption")
    args = parser.parse_args(argv)
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags

    config = cli.load_config_file(args.config)
    config.data_path = args.corpus
    config.model.vocab_size = 8192
    cfg = config_lib.validate(config)
    corpus = corpus_lib.Corpus(args.corpus, cfg.train.eval_fraction)
    with tempfile.TemporaryDirectory() as cache:
        tokenizer = data_lib.load_or_train_tokenizer(
            "", corpus.sample(4_000_000), 8192, cache, cache_key="bench"
        )
        spec, engram = train_lib.token_specs(cfg, tokenizer, cache_dir=cache)
    rows = []
    variants = [(0, 0), (0, 2)] + [(int(w), 2) for w in args.workers.split(",") if int(w) > 0]
    for workers, prefetch in variants:
        stream = corpus.stream("train", seed=0, shuffle=True)
        tokens_per_second = _time_variant(
            stream, tokenizer, spec, engram, cfg, args.batch_size, args.batches, workers, prefetch
        )
        rows.append(
            {
                "data_workers": workers,
                "data_prefetch": prefetch,
                "tokens/s": tokens_per_second,
                "load": f"{os.getloadavg()[0]:.1f}",
            }
        )
    base = rows[0]["tokens/s"]
    for row in rows:
        row["vs no prefetch"] = row["tokens/s"] / base
    print(f"# {machine_description()}")
    print(
        f"# config {pathlib.Path(args.config).name}: seq_len {cfg.train.seq_len}, Engram layers "
        f"{cfg.model.engram.layer_ids}, {cfg.model.engram.num_heads} hash heads per layer; "
        f"batch {args.batch_size} x {cfg.train.seq_len} tokens; {args.batches} timed batches"
    )
    print_table(rows, ["data_workers", "data_prefetch", "tokens/s", "vs no prefetch", "load"])
    flops = accounting.account(cfg.model, cfg.train.seq_len).flops_per_token
    need = []
    for name, (peak, chips) in TPU_HOSTS.items():
        consumed = chips * peak * args.mfu / flops
        need.append(
            {
                "host": f"{name} ({chips} chips)",
                "consumes tokens/s": consumed,
                "best pipeline / consumption": max(r["tokens/s"] for r in rows) / consumed,
            }
        )
    print(f"# consumption at MFU {args.mfu}, {flops / 1e9:.2f} GFLOP/token")
    print_table(need, ["host", "consumes tokens/s", "best pipeline / consumption"])


if __name__ == "__main__":
    from engram_jax import cli

    cli.call(main)
