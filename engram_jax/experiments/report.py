"""What every experiment writes: `results.json` and the shared parts of `summary.md` (the command,
corpus, compression floors, parameter and budget tables, paired differences)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from engram_jax.experiments import floors, stats
from engram_jax.experiments.heldout import Corpus, evaluated_text
from engram_jax.experiments.options import Options
from engram_jax.experiments.runner import Outcome

RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"


def write_summary(workdir: str, lines: Sequence[str]) -> str:
    """Writes `summary.md` from its lines (replaced whole, like `results.json`)."""
    path = os.path.join(workdir, SUMMARY_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    return path


def write_results(workdir: str, experiment: str, runs: list[dict[str, Any]], **extra: Any) -> str:
    path = os.path.join(workdir, RESULTS_FILE)
    payload = {"experiment": experiment, **extra, "runs": runs}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, allow_nan=False, default=_json_default)
    os.replace(path + ".tmp", path)
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the values that are not None
    (diverged runs); NaN when none is left."""
    values = [v for v in values if v is not None]
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def group(runs: Sequence[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    """Runs grouped by `run[key]`, in first-appearance order."""
    out: dict[Any, list[dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(run[key], []).append(run)
    return out


def floors_for(held_out: Sequence[str], corpus: Corpus, eval_tokens: int) -> dict[str, Any]:
    """xz -9e and bzip2 -9 bits per byte of the evaluated bytes and of the whole held-out split."""
    scored = evaluated_text(held_out, corpus.tokenizer_path, eval_tokens)
    whole = "".join(held_out)
    return {
        "evaluated": {"bytes": len(scored.encode("utf-8")), **floors.bits_per_byte(scored)},
        "held_out": {"bytes": len(whole.encode("utf-8")), **floors.bits_per_byte(whole)},
    }


def summary_header(
    title: str,
    experiment: str,
    options: Options,
    corpus: Corpus,
    eval_tokens: int,
    compression: dict[str, Any],
) -> list[str]:
    """The lines every summary.md starts with: command, corpus, evaluation and floors."""
    args = options.command_args()
    ev, ho = compression["evaluated"], compression["held_out"]
    return [
        f"# {title}",
        "",
        "```bash",
        f"python -m engram_jax.experiments.{experiment} " + " \\\n    ".join(args),
        "```",
        "",
        f"Corpus: `{options.data_path}`: {corpus.train_chars:,} characters train, "
        f"{corpus.eval_chars:,} held out (the last {options.holdout_fraction:.0%} of the text, "
        f"{corpus.eval_tokens_available:,} tokens). Each evaluation scores the first "
        f"{eval_tokens:,} held-out tokens ({ev['bytes']:,} bytes).",
        "",
        "Compression floors on the same bytes (a language model worth the name beats them): "
        f"`xz -9e` {ev['xz_9e']:.3f}, `bzip2 -9` {ev['bzip2_9']:.3f} bits/byte "
        f"(whole held-out split: {ho['xz_9e']:.3f} and {ho['bzip2_9']:.3f}).",
        "",
    ]


def accounting_table(runs: Sequence[dict[str, Any]], label: str) -> list[str]:
    """One markdown row per distinct configuration (the first seed's record)."""
    lines = [
        f"| {label} | total params | activated | total excl. emb. | activated excl. emb. | "
        "Engram tables | rho |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, members in group(runs, label).items():
        r = members[0]
        rho = "-" if r["allocation_ratio"] is None else f"{r['allocation_ratio']:.3f}"
        lines.append(
            f"| {key} | {r['total_params']:,} | {r['activated_params']:,} | "
            f"{r['total_params_excl_embeddings']:,} | {r['activated_params_excl_embeddings']:,} | "
            f"{r['engram_table_params']:,} | {rho} |"
        )
    return lines


def evaluated_tokens(config: ml_collections.ConfigDict) -> int:
    """Tokens one evaluation of this config scores."""
    return config.eval_batches * config.batch_size * config.seq_len


def budget_table(runs: Sequence[dict[str, Any]], label: str) -> list[str]:
    """One markdown row per distinct configuration (first seed): tokens seen and how often the
    Engram table rows were updated (an update is a step that changed the row, a lookup one
    token's read of it)."""
    lines = [
        f"| {label} | tokens seen | table share of params | table rows | updates per row "
        "(mean) | rows updated >= 100 times | lookups per row (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for key, members in group(runs, label).items():
        r = members[0]
        lines.append(
            f"| {key} | {r['tokens_seen']:,} | {r['table_param_share']:.1%} | "
            f"{r['table_rows']:,} | {number(r['updates_per_row_mean'], '.1f')} | "
            f"{number(r['rows_updated_100_share'], '.1%')} | "
            f"{number(r['lookups_per_row_mean'], '.1f')} |"
        )
    return lines


def paired_lines(
    runs: Sequence[dict[str, Any]],
    label: str,
    comparisons: Sequence[tuple[Any, Any]],
    metric: str = "final_eval_loss",
    unit: str = "nats/token",
) -> list[str]:
    """Paired differences `treatment - reference` of `metric` per pairing key with their 95%
    Student t interval, beside each side's unpaired mean and spread, then one summary line per
    comparison that says whether its interval contains zero."""
    lines = [
        f"Paired differences of `{metric}` ({unit}): runs with the same pairing key read the same "
        "batches and start from the same values of every parameter both models have; 95% "
        "intervals are Student t over the pairs.",
        "",
        "| comparison | per pair | mean difference | 95% interval | unpaired mean ± std |",
        "|---|---|---:|---|---|",
    ]
    results = []
    for treatment, reference in comparisons:
        d = stats.paired_difference(runs, label, treatment, reference, metric)
        results.append(d)
        unpaired = [
            mean_std([r[metric] for r in runs if r[label] == side])
            for side in (treatment, reference)
        ]
        interval = "-" if math.isnan(d.low) else f"[{d.low:+.4f}, {d.high:+.4f}]"
        per_pair = ", ".join(f"{p}: {v:+.4f}" for p, v in zip(d.pairs, d.differences, strict=True))
        lines.append(
            f"| {treatment} - {reference} | {per_pair or '-'} | {d.mean:+.4f} | {interval} | "
            f"{unpaired[0][0]:.4f} ± {unpaired[0][1]:.4f} vs "
            f"{unpaired[1][0]:.4f} ± {unpaired[1][1]:.4f} |"
        )
    lines.append("")
    for d in results:
        interval = "" if math.isnan(d.low) else f", 95% interval [{d.low:+.4f}, {d.high:+.4f}]"
        lines.append(
            f"- {d.treatment} - {d.reference}: {d.mean:+.4f} {unit} over {len(d.pairs)} paired "
            f"seed(s){interval}: {d.verdict()}."
        )
    return lines


def finish(
    workdir: str,
    experiment: str,
    lines: Sequence[str],
    runs: list[dict[str, Any]],
    **extra: Any,
) -> None:
    """Writes summary.md and results.json and says where."""
    write_summary(workdir, lines)
    write_results(workdir, experiment, runs, **extra)
    print(f"wrote {workdir}/{RESULTS_FILE} and {SUMMARY_FILE}", flush=True)


def header(outcome: Outcome, title: str, experiment: str) -> tuple[list[str], dict[str, Any]]:
    """summary.md's first lines and the results.json keys every experiment writes
    (`eval_tokens`, `compression_floors`)."""
    eval_tokens = evaluated_tokens(outcome.specs[0].config)
    compression = floors_for(outcome.held_out, outcome.corpus, eval_tokens)
    lines = summary_header(
        title, experiment, outcome.options, outcome.corpus, eval_tokens, compression
    )
    return lines, {"eval_tokens": eval_tokens, "compression_floors": compression}


def loss_columns(members: Sequence[dict[str, Any]]) -> str:
    """'seeds | final eval loss | bits/byte' cells (mean ± sample std) of one configuration."""
    loss = mean_std([r["final_eval_loss"] for r in members])
    bpb = mean_std([r["eval_bits_per_byte"] for r in members])
    return f"{len(members)} | {loss[0]:.4f} ± {loss[1]:.4f} | {bpb[0]:.4f} ± {bpb[1]:.4f}"
