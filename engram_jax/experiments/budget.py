"""Training budgets in the units that decide whether a memory can learn: tokens seen, how often
each Engram table row is updated, and table sizes chosen for a target number of updates per row.

A lookup is one read of a row by one token position; an update is one step in which the sparse
table optimizer changes a row: it changes exactly the distinct rows the step's batch looks up
(`memory_ids`), once per step however often the batch reads them. A row read by 50 tokens of
one batch therefore counts 50 lookups and 1 update. Both are counted by replaying the run's
training stream (the trainer's own batches, same seed and order), so no counter runs inside the
training step.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from engram_jax import config as config_lib
from engram_jax import corpus as corpus_lib
from engram_jax import data as data_lib
from engram_jax import train as train_lib

# Rows of the probe tables that count a batch's distinct n-grams: at a few thousand n-grams per
# batch, about one pair in a thousand collides in a million rows.
PROBE_ROWS = 1_000_003
PROBE_STEPS = 16  # Batches the distinct n-grams are averaged over.
WELL_TRAINED_UPDATES = 100  # `rows_updated_100_share` counts rows updated at least this often.


@dataclasses.dataclass(frozen=True)
class TableUsage:
    """What a run's training stream gave the model and its tables."""

    tokens_seen: int  # Real (non-padding) input tokens over all steps.
    table_rows: int  # Addressable rows of all Engram tables (0 without Engram).
    updates_per_row_mean: float | None  # Mean over rows of the steps that updated the row.
    lookups_per_row_mean: float | None  # Mean over rows of the token reads of the row.
    rows_updated_100_share: float | None  # Share of rows updated in >= 100 steps.

    def as_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def training_batches(cfg: config_lib.Config) -> tuple[train_lib.DataSetup, Iterator[dict]]:
    """The trainer's training stream for a validated config whose `tokenizer_path` is set (as in
    every experiment run): the same batches, in the same order, as the trainer reads."""
    if not cfg.train.tokenizer_path:
        raise ValueError("training_batches: config.tokenizer_path is empty; expected a file")
    tokenizer = data_lib.load_tokenizer(cfg.train.tokenizer_path)
    spec, engram = train_lib.token_specs(cfg, tokenizer)
    t = cfg.train
    corpus = corpus_lib.Corpus(t.data_path, t.eval_fraction, t.eval_data_path)
    setup = train_lib.DataSetup(tokenizer, spec, engram, corpus)
    return setup, train_lib.make_batches(setup, cfg, train=True)


def table_usage(config: ml_collections.ConfigDict, steps: int | None = None) -> TableUsage:
    """Replays the run's first `steps` (default: `num_train_steps`) training batches and counts
    tokens, lookups and updates (see the module docstring)."""
    cfg = config_lib.validate(config)
    setup, batches = training_batches(cfg)
    steps = cfg.train.num_train_steps if steps is None else steps
    if setup.engram is None:
        tokens = sum(int(next(batches)["loss_mask"].sum()) for _ in range(steps))
        return TableUsage(tokens, 0, None, None, None)
    hasher = setup.engram.hasher
    updates = [
        np.zeros(sum(hasher.head_vocab_sizes(layer)), np.int64)
        for layer in cfg.model.engram.layer_ids
    ]
    tokens = lookups = 0
    for _ in range(steps):
        batch = next(batches)
        tokens += int(batch["loss_mask"].sum())
        lookups += batch["hash_ids"].size  # [B, L_e, T, M]: one read per position and head
        memory_ids = batch["memory_ids"]  # [shards, L_e, U] flat rows per layer, -1 pads
        for layer, counts in enumerate(updates):
            ids = memory_ids[:, layer].reshape(-1)
            counts[np.unique(ids[ids >= 0])] += 1  # once per step, whichever shard read it
    per_row = np.concatenate(updates)
    return TableUsage(
        tokens_seen=tokens,
        table_rows=int(per_row.size),
        updates_per_row_mean=float(per_row.mean()),
        lookups_per_row_mean=lookups / per_row.size,
        rows_updated_100_share=float((per_row >= WELL_TRAINED_UPDATES).mean()),
    )


def distinct_ngrams_per_step(config: ml_collections.ConfigDict) -> list[float]:
    """Mean number of distinct n-grams one head table sees in one training batch, per order
    2..max_ngram (measured with probe tables of `PROBE_ROWS` rows on the first `PROBE_STEPS`
    batches of the config's stream)."""
    probe = copy.deepcopy(config)
    orders = probe.model.engram.max_ngram - 1
    probe.model.engram.table_rows_per_head = (PROBE_ROWS,) * orders
    cfg = config_lib.validate(probe)
    _, batches = training_batches(cfg)
    heads = cfg.model.engram.heads_per_ngram
    totals = np.zeros(orders)
    samples = 0
    for _ in range(min(PROBE_STEPS, cfg.train.num_train_steps)):
        hash_ids = next(batches)["hash_ids"]  # [B, L_e, T, M], heads order-major
        for layer in range(hash_ids.shape[1]):
            for head in range(hash_ids.shape[3]):
                totals[head // heads] += np.unique(hash_ids[:, layer, :, head]).size
        samples += hash_ids.shape[1] * heads
    return (totals / samples).tolist()


def expected_updates_per_row(distinct: Sequence[float], rows: Sequence[int], steps: int) -> float:
    """Mean updates per row when each step hashes `distinct[n]` n-grams uniformly into
    `rows[n]` rows: a row is hit with probability 1 - exp(-D/R) per step."""
    total = sum(r * steps * -math.expm1(-d / r) for d, r in zip(distinct, rows, strict=True))
    return total / sum(rows)


def rows_for_updates(distinct: Sequence[float], steps: int, target: float) -> tuple[int, ...]:
    """Rows per head table (one per order) for `target` mean updates per row over `steps` steps:
    R = -D / ln(1 - target / steps), the inverse of `expected_updates_per_row`.

    Raises:
      ValueError: target outside (0, steps): a row is updated at most once per step.
    """
    if not 0 < target < steps:
        raise ValueError(
            f"--updates_per_row: got {target:g}; expected a value in (0, {steps}) (a row is "
            "updated at most once per step)"
        )
    return tuple(max(2, round(-d / math.log1p(-target / steps))) for d in distinct)


def planned_rows(config: ml_collections.ConfigDict, target: float) -> tuple[int, ...] | None:
    """Rows per head table (one per order) for `target` mean updates per row over the config's
    `num_train_steps`, from its stream's distinct n-grams per batch; None when target is 0
    (the experiment then sizes rows by parameters alone). Prints the plan."""
    if not target:
        return None
    distinct = distinct_ngrams_per_step(config)
    steps = config.num_train_steps
    rows = rows_for_updates(distinct, steps, target)
    print(
        f"tables for {target:g} updates per row over {steps} steps: distinct n-grams per batch "
        f"and head {', '.join(f'{d:,.0f}' for d in distinct)} (orders 2..) -> rows per head "
        f"{rows}",
        flush=True,
    )
    return rows
