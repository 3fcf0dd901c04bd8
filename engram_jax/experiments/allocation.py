"""The sparsity-allocation sweep: validation loss against rho at fixed total and activated
parameters, at two compute budgets.

    python -m engram_jax.experiments.allocation --data_path=PATH --workdir=DIR --steps=N \
        --seeds=K [--jobs=J] [--rhos=1.0,0.9,0.8,0.7,0.6,0.4] [--budgets=1,3]

rho is the share of the sparse budget (the routed experts a token does not use, plus the Engram
tables) kept in routed experts; the rest becomes Engram table rows (docs/design.md §1.9). Every
point has the same total and activated parameters (`sizing.with_allocation`); the realised rho
differs slightly from the requested one because experts come whole. A budget multiplier m trains
for m x --steps steps (m x the compute of the same model). Mirrors the Engram paper's allocation
figure (a U-shaped loss with its minimum near rho = 75-80% at 2e20 and 6e20 FLOPs).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from engram_jax.experiments import common, iso_param, sizing

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


def build_specs(
    options: common.Options,
    corpus: common.Corpus,
    base: ml_collections.ConfigDict,
    rhos: list[float],
    budgets: list[float],
) -> list[common.RunSpec]:
    specs = []
    for budget in budgets:
        steps = max(1, round(budget * options.steps))
        for rho in rhos:
            model = sizing.with_allocation(base, rho)
            for seed in range(options.seeds):
                config = common.training_config(model, options, corpus, steps=steps, seed=seed)
                labels = {"budget": budget, "rho_target": rho, "config": f"b{budget:g}-rho{rho:g}"}
                specs.append(
                    common.RunSpec(f"b{budget:g}x-rho{rho:.2f}-s{seed}", seed, config, labels)
                )
    return specs


def report(
    options: common.Options,
    corpus: common.Corpus,
    held_out: list[str],
    specs: list[common.RunSpec],
    runs: list[dict[str, Any]],
) -> None:
    from engram_jax.experiments import plots

    workdir = options.workdir
    eval_tokens = common.evaluated_tokens(specs[0].config)
    compression = common.floors_for(held_out, corpus, eval_tokens)
    points: dict[float, list[tuple[float, float, float]]] = {}
    for budget, members in common.group(runs, "budget").items():
        for _, same in common.group(members, "rho_target").items():
            loss = common.mean_std([r["final_eval_loss"] for r in same])
            points.setdefault(budget, []).append((same[0]["allocation_ratio"], *loss))
    fig, axes = plots.new_figure()
    ax = axes[0, 0]
    minima = {}
    for i, (budget, pts) in enumerate(points.items()):
        pts.sort()
        rho = [100 * p[0] for p in pts]
        ax.errorbar(
            rho,
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            marker="o",
            capsize=4,
            color=f"C{i}",
            label=f"{budget:g} x {options.steps} steps",
        )
        best = min(pts, key=lambda p: p[1])
        minima[budget] = best
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
    png = plots.save(fig, workdir, "allocation.png")

    lines = common.summary_header(
        "Sparsity allocation: validation loss against rho",
        NAME,
        options,
        corpus,
        eval_tokens,
        compression,
    )
    lines += [
        "Every point has the same total and activated parameters (the routed experts a token "
        "does not use move into Engram table rows; Engram's activated projections are paid for "
        "by a narrower dense FFN layer). rho below is the realised ratio from the accounting.",
        "",
        *common.accounting_table([r for r in runs if r["budget"] == runs[0]["budget"]], "config"),
        "",
        "| budget | rho (realised) | routed experts | seeds | final eval loss | bits/byte |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    config_by_name = {s.name: s.config for s in specs}
    for budget, members in common.group(runs, "budget").items():
        for _, same in common.group(members, "rho_target").items():
            cfg = config_by_name[same[0]["name"]]
            loss = common.mean_std([r["final_eval_loss"] for r in same])
            bpb = common.mean_std([r["eval_bits_per_byte"] for r in same])
            lines.append(
                f"| {budget:g} x {options.steps} steps | {same[0]['allocation_ratio']:.3f} | "
                f"{cfg.model.moe.num_experts} | {len(same)} | {loss[0]:.4f} ± {loss[1]:.4f} | "
                f"{bpb[0]:.4f} ± {bpb[1]:.4f} |"
            )
    lines.append("")
    for budget, best in minima.items():
        lines.append(f"- budget {budget:g}x: lowest loss {best[1]:.4f} at rho = {best[0]:.3f}")
    lines += ["", f"![allocation]({png})", ""]
    common.write_summary(workdir, lines)
    common.write_results(
        workdir,
        NAME,
        runs,
        eval_tokens=eval_tokens,
        compression_floors=compression,
        minima={f"{b:g}": {"rho": p[0], "loss": p[1]} for b, p in minima.items()},
    )


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    options = common.Options.from_flags()
    rhos = parse_floats(flags.FLAGS.rhos, "rhos")
    budgets = parse_floats(flags.FLAGS.budgets, "budgets")
    base = base_config()
    common.apply_overrides(base, options.overrides)
    corpus, _, held_out = common.setup(options, base)
    specs = build_specs(options, corpus, base, rhos, budgets)
    common.print_configs(
        [s for s in specs if s.labels["budget"] == budgets[0]],
        lambda s: f"rho {s.labels['rho_target']:g}",
    )
    runs = common.run_experiment(options.workdir, specs, options.jobs)
    report(options, corpus, held_out, specs, runs)
    print(f"wrote {options.workdir}/{common.RESULTS_FILE} and {common.SUMMARY_FILE}", flush=True)


if __name__ == "__main__":
    from absl import flags

    from engram_jax import cli

    common.define_flags(default_steps=300, default_seeds=1)
    flags.DEFINE_string("rhos", "1.0,0.9,0.8,0.7,0.6,0.4", "Requested allocation ratios.")
    flags.DEFINE_string("budgets", "1,3", "Compute budgets as multiples of --steps.")
    cli.run(main)
