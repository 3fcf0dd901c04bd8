"""Engram + MoE against an MoE and a dense model at matched parameters.

    python -m engram_jax.experiments.iso_param --data_path=PATH --workdir=DIR --steps=N --seeds=K \
        [--jobs=J] [--rho=0.75] [--updates_per_row=U] [--variants=dense,moe,engram]

The MoE baseline and Engram + MoE have equal total and activated parameters (Engram takes
1 - rho of the sparse budget from the routed experts, docs/design.md §1.9); the dense model has
the same activated parameters (a dense model's total equals its activated count). Mirrors the
Engram paper's Dense-4B / MoE-27B / Engram-27B comparison at a scale that fits one machine.
"""

from __future__ import annotations

import ml_collections

from engram_jax.experiments import budget, report, runner, sizing
from engram_jax.experiments.heldout import Corpus
from engram_jax.experiments.options import Options, shipped_config

NAME = "iso_param"
VARIANTS = ("dense", "moe", "engram")
# (treatment, reference) of the paired differences in summary.md.
COMPARISONS = (("engram", "moe"), ("dense", "moe"), ("engram", "dense"))


def base_config() -> ml_collections.ConfigDict:
    """The sparse model every Engram experiment starts from: the shipped `tiny` config (4 layers
    of width 128, 1 dense + 3 MoE layers, mHC with 4 streams) with twice its routed experts at
    half their width (the same routed parameters, more of them unused per token: the sparse
    budget) and one Engram layer (orders 2-3, 4 heads each, row width 8) that
    `sizing.with_allocation` fills with table rows (~1M activated parameters without the
    embeddings)."""
    c = shipped_config("tiny")
    c.warmup_steps = 50
    m = c.model
    m.moe.num_experts = 16
    m.moe.expert_hidden_size = 64
    m.engram.layer_ids = (1,)
    m.engram.embed_per_ngram = 32
    return c


def variant_config(
    base: ml_collections.ConfigDict,
    variant: str,
    rho: float,
    rows_per_head: tuple[int, ...] | None = None,
) -> ml_collections.ConfigDict:
    if variant == "dense":
        return sizing.dense_twin(base)
    if variant == "moe":
        return sizing.moe_baseline(base)
    if variant == "engram":
        return sizing.with_allocation(base, rho, rows_per_head)
    raise ValueError(f"variant: got {variant!r}; expected one of {VARIANTS}")


def parse_variants(text: str) -> tuple[str, ...]:
    """`--variants` as a tuple in VARIANTS order; at least two, so that something is compared."""
    chosen = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or len(set(chosen)) < 2:
        raise ValueError(
            f"--variants: got {text!r}; expected two or more distinct names of {VARIANTS}, "
            "comma-separated"
        )
    return tuple(v for v in VARIANTS if v in chosen)


def build_specs(
    options: Options,
    corpus: Corpus,
    base: ml_collections.ConfigDict,
    rho: float,
    variants: tuple[str, ...] = VARIANTS,
) -> list[runner.RunSpec]:
    probe = runner.training_config(sizing.with_allocation(base, rho), options, corpus)
    rows = budget.planned_rows(probe, options.updates_per_row)
    specs = []
    for seed in range(options.seeds):
        for variant in variants:
            model = variant_config(base, variant, rho, rows)
            config = runner.training_config(model, options, corpus, seed=seed)
            specs.append(runner.RunSpec(f"{variant}-s{seed}", seed, config, {"variant": variant}))
    return specs


def loss_plots(options: Options, by_variant: dict[str, list[dict]], floor: dict) -> tuple[str, str]:
    """Validation curves per variant and final bits per byte against the compressors' floors."""
    from engram_jax.experiments import plots

    workdir = options.workdir
    fig, axes = plots.new_figure()
    ax = axes[0, 0]
    for variant, members in by_variant.items():
        plots.seed_band(ax, workdir, members, "eval_loss", variant)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Validation loss, mean and range over {options.seeds} seed(s)")
    ax.legend()
    curves_png = plots.save(fig, workdir, "validation_curves.png")

    fig, axes = plots.new_figure()
    ax = axes[0, 0]
    names = list(by_variant)
    stats = [report.mean_std([r["eval_bits_per_byte"] for r in by_variant[n]]) for n in names]
    ax.bar(names, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=6, color="C0")
    ax.axhline(floor["xz_9e"], color="C3", linestyle="--", label=f"xz -9e {floor['xz_9e']:.3f}")
    ax.axhline(
        floor["bzip2_9"], color="C2", linestyle=":", label=f"bzip2 -9 {floor['bzip2_9']:.3f}"
    )
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Final bits per byte (mean, sample std over seeds)")
    ax.legend()
    return curves_png, plots.save(fig, workdir, "final_bits_per_byte.png")


def report_runs(outcome: runner.Outcome, rho: float) -> None:
    runs = outcome.runs
    by_variant = report.group(runs, "variant")
    names = {"dense": "dense", "moe": "MoE", "engram": "Engram + MoE"}
    title = " vs ".join(names[v] for v in reversed(VARIANTS) if v in by_variant)
    lines, extra = report.header(outcome, f"{title} at matched parameters", NAME)
    floor = extra["compression_floors"]["evaluated"]
    curves_png, bpb_png = loss_plots(outcome.options, by_variant, floor)
    lines += [
        f"MoE and Engram + MoE (rho = {rho}) have equal total and activated parameters; the "
        "dense model matches the activated count only. Engram's activated projections are paid "
        "for by a narrower dense FFN layer (`mlp_hidden_size` below).",
        "",
        *report.accounting_table(runs, "variant"),
        "",
        *report.budget_table(runs, "variant"),
        "",
        "| variant | mlp_hidden_size | routed experts | seeds | final eval loss | bits/byte | "
        "wall time per run |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    config_by_name = {s.name: s.config for s in outcome.specs}
    for variant, members in by_variant.items():
        cfg = config_by_name[members[0]["name"]]
        walls = [r["wall_seconds"] for r in members if r["wall_seconds"]]
        wall = f"{sum(walls) / len(walls):.0f} s" if walls else "-"
        lines.append(
            f"| {variant} | {cfg.model.mlp_hidden_size} | {cfg.model.moe.num_experts} | "
            f"{report.loss_columns(members)} | {wall} |"
        )
    lines += [
        "",
        *report.paired_lines(
            runs, "variant", [c for c in COMPARISONS if set(c) <= set(by_variant)]
        ),
        "",
        f"![validation curves]({curves_png})",
        "",
        f"![final bits per byte]({bpb_png})",
        "",
    ]
    report.finish(outcome.options.workdir, NAME, lines, runs, rho=rho, **extra)


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    rho = flags.FLAGS.rho
    variants = parse_variants(flags.FLAGS.variants)
    options, base, corpus, _, held_out = runner.start(base_config())
    specs = build_specs(options, corpus, base, rho, variants)
    outcome = runner.run_all(options, corpus, held_out, specs, lambda s: s.labels["variant"])
    report_runs(outcome, rho)


if __name__ == "__main__":
    from absl import flags

    from engram_jax import cli
    from engram_jax.experiments.options import define_flags

    define_flags(default_steps=600, default_seeds=3, tables=True)
    flags.DEFINE_float("rho", 0.75, "Routed-expert share of the sparse budget in Engram + MoE.")
    flags.DEFINE_string(
        "variants",
        ",".join(VARIANTS),
        "Comma-separated subset of the variants to train (dense, moe, engram); the paired "
        "comparisons are those whose two variants are both trained.",
    )
    cli.run(main)
