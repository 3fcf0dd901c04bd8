"""What a trained Engram model's gate does, and what switching the memory off costs.

    python -m engram_jax.experiments.gate_analysis --data_path=PATH --workdir=DIR --steps=N \
        --seeds=K [--jobs=J] [--rho=0.75] [--updates_per_row=U]

Trains the iso-parameter experiment's Engram + MoE model (one run per seed), then, on exactly the
held-out tokens an evaluation scores:

- a heatmap of the gate (mean over residual streams) over the first held-out sequences;
- the tokens, bigrams and trigrams with the highest mean gate (the gate at position t weighs the
  n-grams ending at t, docs/design.md §1.5);
- the loss with Engram switched off at inference, split into four buckets of equal token count by
  the target token's frequency in the training text. Switching off zeroes the Engram value
  projection, so each Engram layer adds exactly zero (the gate multiplies a zero value, and the
  convolution of zeros is zero).

Mirrors the Engram paper's gate visualisations (the gate fires on multi-token entities and
formulaic phrases) and its inference-time ablation (factual recall collapses, reading
comprehension mostly survives).
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from engram_jax import data as data_lib
from engram_jax.experiments import budget, iso_param, report, runner, sizing, stats
from engram_jax.experiments.heldout import Corpus
from engram_jax.experiments.options import Options

NAME = "gate_analysis"
NUM_BUCKETS = 4


def base_config() -> ml_collections.ConfigDict:
    return iso_param.base_config()


def build_specs(
    options: Options, corpus: Corpus, base: ml_collections.ConfigDict, rho: float
) -> list[runner.RunSpec]:
    probe = runner.training_config(sizing.with_allocation(base, rho), options, corpus)
    model = sizing.with_allocation(base, rho, budget.planned_rows(probe, options.updates_per_row))
    return [
        runner.RunSpec(
            f"engram-s{seed}",
            seed,
            runner.training_config(model, options, corpus, seed=seed),
            {"variant": "engram"},
        )
        for seed in range(options.seeds)
    ]


def engram_off(params: Any) -> Any:
    """The parameters with every Engram value projection zeroed: each Engram layer then adds 0."""

    def zero(path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        if "engram" in names and names[-1] in ("value_kernel", "value_bias"):
            return jnp.zeros_like(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(zero, params)


def _forward_fn(model):
    """Per-token NLL [B, T] and gates [L_e, B, T, G] of one batch."""

    def forward(variables, batch):
        logits, aux = model.apply(
            variables, batch["inputs"], batch["positions"], batch["segment_ids"], batch["hash_ids"]
        )
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
        return nll, aux["engram_gates"]

    return jax.jit(forward)


def token_counts(documents: list[str], tokenizer, vocab_size: int) -> np.ndarray:
    """Occurrences of every token id in the documents (the training text)."""
    encode = data_lib.make_encoder(tokenizer)
    counts = np.zeros(vocab_size, np.int64)
    for document in documents:
        np.add.at(counts, encode(document), 1)
    return counts


def _score(generator, held_out: list[str]) -> dict[str, np.ndarray]:
    """Per-token NLL with Engram on and off, the gates and the batch fields of the held-out
    batches one evaluation scores, concatenated over batches (N rows)."""
    from engram_jax.model import Transformer

    config, spec = generator.config, generator.spec
    stream = data_lib.make_pipeline(
        held_out,
        generator.tokenizer,
        spec,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        seed=config.seed,
        shuffle=False,
        add_eos=spec.eos_id is not None,
        engram=generator.engram,
    )
    batches = [next(stream) for _ in range(config.eval_batches)]
    forward = _forward_fn(Transformer(generator.model_config))
    variables_on = generator.variables
    variables_off = {**variables_on, "params": engram_off(variables_on["params"])}
    parts: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for batch in batches:
        device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
        on, gate = jax.device_get(forward(variables_on, device_batch))
        off, _ = jax.device_get(forward(variables_off, device_batch))
        parts["nll_on"].append(on)
        parts["nll_off"].append(off)
        parts["gates_LNT"].append(gate.mean(axis=-1))  # [L_e, B, T, G] -> [L_e, B, T]
        for key in ("inputs", "targets", "loss_mask", "segment_ids"):
            parts[key].append(batch[key])
    out = {k: np.concatenate(v, axis=1 if k == "gates_LNT" else 0) for k, v in parts.items()}
    out["mask"] = out.pop("loss_mask") > 0
    return out  # nll_* [N, T], gates_LNT [L_e, N, T], the rest [N, T]


def _frequency_buckets(scored: dict[str, np.ndarray], counts: np.ndarray) -> list[dict[str, Any]]:
    """The loss on and off in buckets of equal token count, by the target's training count."""
    mask = scored["mask"]
    freq = counts[scored["targets"][mask]]
    order = np.argsort(freq, kind="stable")[::-1]  # most frequent first
    buckets = []
    for i, part in enumerate(np.array_split(order, NUM_BUCKETS)):
        if part.size == 0:
            continue
        on, off = scored["nll_on"][mask][part], scored["nll_off"][mask][part]
        buckets.append(
            {
                "bucket": i,
                "tokens": int(part.size),
                "train_count_min": int(freq[part].min()),
                "train_count_max": int(freq[part].max()),
                "loss_engram_on": float(on.mean()),
                "loss_engram_off": float(off.mean()),
                "loss_increase": float(off.mean() - on.mean()),
            }
        )
    return buckets


def _gate_by_ngram(
    gate_NT: np.ndarray, inputs: np.ndarray, segments: np.ndarray
) -> dict[str, dict[tuple[int, ...], list]]:
    """`{"token" | "bigram" | "trigram": {ids: [gate sum, count]}}` over the n-grams ending at
    each real position (inside one document)."""
    stats: dict[str, collections.defaultdict] = {
        name: collections.defaultdict(lambda: [0.0, 0]) for name in ("token", "bigram", "trigram")
    }
    n, t = inputs.shape
    for row in range(n):
        for pos in range(t):
            if segments[row, pos] <= 0:
                continue
            g = float(gate_NT[row, pos])
            keys = {"token": (int(inputs[row, pos]),)}
            for order_n, name in ((2, "bigram"), (3, "trigram")):
                start = pos - order_n + 1
                if start >= 0 and np.all(segments[row, start : pos + 1] == segments[row, pos]):
                    keys[name] = tuple(int(x) for x in inputs[row, start : pos + 1])
            for name, key in keys.items():
                entry = stats[name][key]
                entry[0] += g
                entry[1] += 1
    return stats


def analyze(
    run_path: str,
    train_documents: list[str],
    held_out: list[str],
    *,
    min_count: int,
    top: int = 15,
) -> dict[str, Any]:
    """Gates and the Engram-off ablation of the trained model in `run_path` (its latest
    checkpoint) on the held-out tokens its evaluation scores."""
    from engram_jax.generate import Generator

    generator = Generator(run_path)
    tokenizer = generator.tokenizer
    scored = _score(generator, held_out)
    mask, segments = scored["mask"], scored["segment_ids"]
    counts = token_counts(train_documents, tokenizer, generator.spec.vocab_size)
    gates_LNT = scored["gates_LNT"]
    gate_NT = gates_LNT.mean(axis=0)  # [N, T]: mean over Engram layers
    valid = segments > 0
    stats = _gate_by_ngram(gate_NT, scored["inputs"], segments)

    def ranked(name: str) -> list[dict[str, Any]]:
        items = [(s / c, c, k) for k, (s, c) in stats[name].items() if c >= min_count]
        items.sort(key=lambda x: -x[0])
        return [
            {"text": tokenizer.decode(list(k)), "ids": list(k), "mean_gate": g, "count": c}
            for g, c, k in items[:top]
        ]

    return {
        "engram_on_loss": float(scored["nll_on"][mask].mean()),
        "engram_off_loss": float(scored["nll_off"][mask].mean()),
        "analysed_tokens": int(mask.sum()),
        "mean_gate": float(gate_NT[valid].mean()),
        "mean_gate_per_layer": [float(g[valid].mean()) for g in gates_LNT],
        "frequency_buckets": _frequency_buckets(scored, counts),
        "top_tokens": ranked("token"),
        "top_bigrams": ranked("bigram"),
        "top_trigrams": ranked("trigram"),
        # For the heatmap (not written to results.json).
        "_heatmap": {
            "gates_LNT": gates_LNT,
            "inputs": scored["inputs"],
            "valid": valid,
            "layer_ids": list(generator.config.model.engram.layer_ids),
            "tokenizer": tokenizer,
        },
    }


def _token_label(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([int(token_id)]).replace(" ", "\u00b7")  # a visible space
    return repr(text)[1:-1][:8]


def plot_heatmap(workdir: str, heat: dict[str, Any], rows: int, length: int) -> str:
    from engram_jax.experiments import plots

    gates_LNT = heat["gates_LNT"]
    num_layers = gates_LNT.shape[0]
    rows = min(rows, gates_LNT.shape[1])
    length = min(length, gates_LNT.shape[2])
    fig, axes = plots.new_figure(0.28 * length + 2.0, 0.5 * num_layers + 1.0, nrows=rows)
    image = None
    for r in range(rows):
        ax = axes[r, 0]
        data = np.where(heat["valid"][r, :length][None, :], gates_LNT[:, r, :length], np.nan)
        image = ax.imshow(data, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_yticks(range(num_layers))
        ax.set_yticklabels([f"layer {i}" for i in heat["layer_ids"]], fontsize=7)
        ax.set_xticks(range(length))
        ax.set_xticklabels(
            [_token_label(heat["tokenizer"], x) for x in heat["inputs"][r, :length]],
            rotation=90,
            fontsize=7,
        )
        ax.set_title(f"held-out sequence {r}", fontsize=8)
    fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.02, label="gate (mean over streams)")
    return plots.save(fig, workdir, "gate_heatmap.png")


def plot_ablation(workdir: str, analysis: dict[str, Any]) -> str:
    from engram_jax.experiments import plots

    buckets = analysis["frequency_buckets"]
    fig, axes = plots.new_figure(ncols=2)
    ax = axes[0, 0]
    x = np.arange(len(buckets))
    labels = [f"{b['train_count_min']:,}-\n{b['train_count_max']:,}" for b in buckets]
    ax.bar(x - 0.2, [b["loss_engram_on"] for b in buckets], 0.4, label="Engram on")
    ax.bar(x + 0.2, [b["loss_engram_off"] for b in buckets], 0.4, label="Engram off")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_xlabel("target token's count in the training text (frequent -> rare)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend()
    ax.set_title("Loss with Engram switched off at inference")
    ax = axes[0, 1]
    top = analysis["top_tokens"][:10] + analysis["top_bigrams"][:10]
    ax.barh(range(len(top)), [e["mean_gate"] for e in top], color="C2")
    ax.set_yticks(range(len(top)))
    ax.set_yticklabels([repr(e["text"])[:24] for e in top], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("mean gate")
    ax.set_title("Highest mean gate: tokens, then bigrams")
    return plots.save(fig, workdir, "engram_ablation_and_top_gates.png")


def _ablation_lines(runs: list[dict[str, Any]], first: dict[str, Any], min_count: int) -> list[str]:
    lines = [
        "| seed | final eval loss | Engram on (analysed tokens) | Engram off | increase |",
        "|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        a = run["analysis"]
        lines.append(
            f"| {run['seed']} | {run['final_eval_loss']:.4f} | {a['engram_on_loss']:.4f} | "
            f"{a['engram_off_loss']:.4f} | {a['engram_off_loss'] - a['engram_on_loss']:+.4f} |"
        )
    increases = [r["analysis"]["engram_off_loss"] - r["analysis"]["engram_on_loss"] for r in runs]
    mean, low, high = stats.t_interval(increases)
    interval = (
        "no interval (one seed)" if math.isnan(low) else f"95% interval [{low:+.4f}, {high:+.4f}]"
    )
    lines += [
        "",
        f"- Engram off - on (paired: the same model and tokens): {mean:+.4f} nats/token over "
        f"{len(runs)} seed(s), {interval}.",
        "",
        f"By target-token frequency (seed {runs[0]['seed']}; four buckets of equal token count):",
        "",
        "| train count | tokens | loss on | loss off | increase |",
        "|---|---:|---:|---:|---:|",
    ]
    for b in first["frequency_buckets"]:
        lines.append(
            f"| {b['train_count_min']:,}-{b['train_count_max']:,} | {b['tokens']:,} | "
            f"{b['loss_engram_on']:.4f} | {b['loss_engram_off']:.4f} | {b['loss_increase']:+.4f} |"
        )
    for name in ("top_tokens", "top_bigrams", "top_trigrams"):
        lines += ["", f"Highest mean gate, {name[4:]} (at least {min_count} occurrences):", ""]
        lines += [
            f"- `{e['text']!r}`: {e['mean_gate']:.3f} ({e['count']} times)" for e in first[name]
        ]
    return lines


def report_runs(
    outcome: runner.Outcome, train_documents: list[str], min_count: int, rho: float
) -> None:
    title = "Engram gate analysis and inference-time ablation"
    lines, extra = report.header(outcome, title, NAME)
    options, runs, held_out = outcome.options, outcome.runs, outcome.held_out
    analyses = []
    for run in runs:
        analysis = analyze(
            os.path.join(options.workdir, run["run_dir"]),
            train_documents,
            held_out,
            min_count=min_count,
        )
        heat = analysis.pop("_heatmap")
        run["analysis"] = analysis
        analyses.append((analysis, heat))
    first, heat = analyses[0]
    heatmap_png = plot_heatmap(options.workdir, heat, rows=4, length=40)
    ablation_png = plot_ablation(options.workdir, first)
    lines += [
        f"Model: the iso-parameter Engram + MoE model (rho = {rho}).",
        "",
        *report.accounting_table(runs, "variant"),
        "",
        *report.budget_table(runs, "variant"),
        "",
        *_ablation_lines(runs, first, min_count),
        "",
        f"![gate heatmap]({heatmap_png})",
        "",
        f"![ablation]({ablation_png})",
        "",
    ]
    report.finish(options.workdir, NAME, lines, runs, rho=rho, **extra)


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    rho, min_count = flags.FLAGS.rho, flags.FLAGS.min_count
    options, base, corpus, train_documents, held_out = runner.start(base_config())
    specs = build_specs(options, corpus, base, rho)
    outcome = runner.run_all(options, corpus, held_out, specs, lambda s: "engram")
    report_runs(outcome, train_documents, min_count, rho)


if __name__ == "__main__":
    from absl import flags

    from engram_jax import cli
    from engram_jax.experiments.options import define_flags

    define_flags(default_steps=600, default_seeds=1, tables=True)
    flags.DEFINE_float("rho", 0.75, "Routed-expert share of the sparse budget.")
    flags.DEFINE_integer("min_count", 5, "Occurrences a token or n-gram needs to be ranked.")
    cli.run(main)
