"""The sparsity-allocation sweep: validation loss against rho at fixed total and activated
parameters, at two compute budgets.

    python -m engram_jax.experiments.allocation --data_path=PATH --workdir=DIR --steps=N \
        --seeds=K [--jobs=J] [--rhos=1.0,0.9,0.8,0.7,0.6,0.4] [--budgets=1,3] \
        [--updates_per_row=U]

rho is the share of the sparse budget (the routed experts a token does not use, plus the Engram
tables) kept in routed experts; the rest becomes Engram table rows (docs/design.md §1.9). Every
point has the same total and activated parameters (`sizing.with_allocation`); the realised rho
differs slightly from the requested one because experts come whole. A budget multiplier m trains
for m x --steps steps (m x the compute of the same model). Mirrors the Engram paper's allocation
figure (a U-shaped loss with its minimum near rho = 75-80% at 2e20 and 6e20 FLOPs). With
`--updates_per_row`, table rows are sized for that target at the base budget (--steps) and every
budget trains the same models.
"""

from __future__ import annotations

import ml_collections

from engram_jax.experiments import budget, iso_param, report, runner, sizing
from engram_jax.experiments.heldout import Corpus
from engram_jax.experiments.options import Options

NAME = "allocation"


def base_config() -> ml_collections.ConfigDict:
    """The iso-parameter experiment's sparse model."""
    return iso_param.base_config()


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"--{flag}: got {text!r}; expected comma-separated numbers") from e
    if not values:
        raise ValueError(f"--{flag}: got {text!r}; expected at least one number")
    return values


def config_label(multiple: float, rho: float) -> str:
    return f"b{multiple:g}-rho{rho:g}"


def build_specs(
    options: Options,
    corpus: Corpus,
    base: ml_collections.ConfigDict,
    rhos: list[float],
    budgets: list[float],
) -> list[runner.RunSpec]:
    probe = runner.training_config(sizing.with_allocation(base, min(rhos)), options, corpus)
    rows = budget.planned_rows(probe, options.updates_per_row) if min(rhos) < 1 else None
    specs = []
    for multiple in budgets:
        steps = max(1, round(multiple * options.steps))
        for rho in rhos:
            model = sizing.with_allocation(base, rho, rows)
            for seed in range(options.seeds):
                config = runner.training_config(model, options, corpus, steps=steps, seed=seed)
                labels = {
                    "budget": multiple,
                    "rho_target": rho,
                    "config": config_label(multiple, rho),
                }
                name = f"b{multiple:g}x-rho{rho:.2f}-s{seed}"
                specs.append(runner.RunSpec(name, seed, config, labels, f"b{multiple:g}-s{seed}"))
    return specs


def comparisons(rhos: list[float], budgets: list[float]) -> list[tuple[str, str]]:
    """Every rho against the MoE baseline (rho = 1, else the largest rho) of its budget."""
    reference = 1.0 if 1.0 in rhos else max(rhos)
    return [
        (config_label(b, rho), config_label(b, reference))
        for b in budgets
        for rho in rhos
        if rho != reference
    ]


def _plot(options: Options, points: dict[float, list[tuple[float, float, float]]]) -> str:
    """Loss against realised rho per budget, each budget's minimum starred."""
    from engram_jax.experiments import plots

    fig, axes = plots.new_figure()
    ax = axes[0, 0]
    for i, (multiple, pts) in enumerate(points.items()):
        rho = [100 * p[0] for p in pts]
        ax.errorbar(
            rho,
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            marker="o",
            capsize=4,
            color=f"C{i}",
            label=f"{multiple:g} x {options.steps} steps",
        )
        best = min(pts, key=lambda p: p[1])
        ax.plot(
            [100 * best[0]],
            [best[1]],
            marker="*",
            markersize=16,
            color=f"C{i}",
            markeredgecolor="black",
            linestyle="none",
        )
    ax.set_xlabel("rho: routed-expert share of the sparse budget (%)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("Sparsity allocation at fixed total and activated parameters (* = minimum)")
    ax.invert_xaxis()
    ax.legend()
    return plots.save(fig, options.workdir, "allocation.png")


def report_runs(outcome: runner.Outcome, pairs: list[tuple[str, str]]) -> None:
    title = "Sparsity allocation: validation loss against rho"
    lines, extra = report.header(outcome, title, NAME)
    options, runs = outcome.options, outcome.runs
    points: dict[float, list[tuple[float, float, float]]] = {}
    for multiple, members in report.group(runs, "budget").items():
        for _, same in report.group(members, "rho_target").items():
            loss = report.mean_std([r["final_eval_loss"] for r in same])
            points.setdefault(multiple, []).append((same[0]["allocation_ratio"], *loss))
    for pts in points.values():
        pts.sort()
    minima = {b: min(pts, key=lambda p: p[1]) for b, pts in points.items()}
    png = _plot(options, points)
    first_budget = [r for r in runs if r["budget"] == runs[0]["budget"]]
    lines += [
        "Every point has the same total and activated parameters (the routed experts a token "
        "does not use move into Engram table rows; Engram's activated projections are paid for "
        "by a narrower dense FFN layer). rho below is the realised ratio from the accounting.",
        "",
        *report.accounting_table(first_budget, "config"),
        "",
        *report.budget_table(runs, "config"),
        "",
        "| budget | rho (realised) | routed experts | seeds | final eval loss | bits/byte |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    config_by_name = {s.name: s.config for s in outcome.specs}
    for multiple, members in report.group(runs, "budget").items():
        for _, same in report.group(members, "rho_target").items():
            cfg = config_by_name[same[0]["name"]]
            lines.append(
                f"| {multiple:g} x {options.steps} steps | {same[0]['allocation_ratio']:.3f} | "
                f"{cfg.model.moe.num_experts} | {report.loss_columns(same)} |"
            )
    lines.append("")
    for multiple, best in minima.items():
        lines.append(f"- budget {multiple:g}x: lowest loss {best[1]:.4f} at rho = {best[0]:.3f}")
    lines += ["", *report.paired_lines(runs, "config", pairs), "", f"![allocation]({png})", ""]
    minima_json = {f"{b:g}": {"rho": p[0], "loss": p[1]} for b, p in minima.items()}
    report.finish(options.workdir, NAME, lines, runs, minima=minima_json, **extra)


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    rhos = parse_floats(flags.FLAGS.rhos, "rhos")
    budgets = parse_floats(flags.FLAGS.budgets, "budgets")
    options, base, corpus, _, held_out = runner.start(base_config())
    specs = build_specs(options, corpus, base, rhos, budgets)

    def describe(spec: runner.RunSpec) -> str:  # printed once per rho (the first budget)
        return f"rho {spec.labels['rho_target']:g}" if spec.labels["budget"] == budgets[0] else ""

    outcome = runner.run_all(options, corpus, held_out, specs, describe)
    report_runs(outcome, comparisons(rhos, budgets))


if __name__ == "__main__":
    from absl import flags

    from engram_jax import cli
    from engram_jax.experiments.options import define_flags

    define_flags(default_steps=300, default_seeds=1, tables=True)
    flags.DEFINE_string("rhos", "1.0,0.9,0.8,0.7,0.6,0.4", "Requested allocation ratios.")
    flags.DEFINE_string("budgets", "1,3", "Compute budgets as multiples of --steps.")
    cli.run(main)
