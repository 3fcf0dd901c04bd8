"""MoE alone against four memories added to it at equal total and activated parameters: Engram,
OverEncoding, Gemma 3n's per-layer embeddings (PLE) and UltraMem.

    python -m engram_jax.experiments.memory_variants --data_path=PATH --workdir=DIR --steps=N \
        --seeds=K [--jobs=J] [--rho=0.75]

Every memory takes its parameters from the same budget, as iso_param's Engram + MoE does
(docs/design.md §1.9): the routed experts shrink to `rho` of the unused ones, the memory's
activated parameters (projections, norms, queries, keys) are paid for by a narrower dense FFN
(`mlp_hidden_size`), and its unread parameters (tables, unselected value rows) are sized to give
back the MoE baseline's total:

- engram: `sizing.with_allocation` (table rows per head);
- overencoding: `base_rows` of its sub-tables;
- ple: the per-layer width (table rows = the vocabulary), then the table rows for the remainder;
- ultramem: the key grid size n (n^2 / E physical value rows) at the Engram layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import ml_collections

from engram_jax.experiments import iso_param, report, runner, sizing
from engram_jax.experiments.heldout import Corpus
from engram_jax.experiments.options import Options

NAME = "memory_variants"
VARIANTS = ("moe", "engram", "overencoding", "ple", "ultramem")


def base_config() -> ml_collections.ConfigDict:
    """iso_param's sparse model with every memory's layout set (and switched off): Engram at
    layer 1, OverEncoding orders 2-3 with two sub-tables each, 16-wide per-layer vectors, and an
    UltraMem layout (rank-2 Tucker keys of width 16, two cores, 16 of 8 x 8 candidate slots read,
    4 virtual blocks of 32-wide rows) placed at the Engram layers."""
    c = iso_param.base_config()
    m = c.model
    m.overencoding.max_ngram = 3
    m.overencoding.tables_per_ngram = 2
    m.ple.width = 16
    u = m.ultramem
    u.key_dim = 16
    u.tucker_rank = 2
    u.num_cores = 2
    u.top_k = 16
    u.candidates = 8
    u.value_expansion = 4
    u.value_width = 32
    return c


def _pay_activated(c: ml_collections.ConfigDict, target_activated: int, what: str) -> None:
    """Narrows the dense FFN layers so that `c` activates `target_activated` parameters (to
    within 3 D per dense layer)."""
    dense_layers = min(c.model.num_dense_layers, c.model.num_layers)
    if not dense_layers:
        return
    extra = sizing.accounting(c).activated_params - target_activated
    width = c.model.mlp_hidden_size - round(extra / (3 * c.model.hidden_size * dense_layers))
    if width < 1:
        raise ValueError(
            f"memory_variants({what}): its activated parameters exceed what the dense FFN layers "
            f"can give back (width would be {width}); use a smaller layout"
        )
    c.model.mlp_hidden_size = width


def _fewer_experts(base: ml_collections.ConfigDict, rho: float) -> ml_collections.ConfigDict:
    c = sizing.moe_baseline(base)
    e = c.model.moe
    e.num_experts = sizing.routed_experts_for(e.num_experts, e.top_k, rho)
    return c


def _solve_linear(c, set_knob: Callable[[int], None], target_total: int, lo: int) -> int:
    """The integer knob (>= lo) whose total parameters are nearest `target_total`, for a total
    that grows linearly with it (tables)."""
    set_knob(lo)
    at_lo = sizing.accounting(c).total_params
    set_knob(lo + 1)
    per_unit = sizing.accounting(c).total_params - at_lo
    knob = max(lo, lo + round((target_total - at_lo) / per_unit))
    set_knob(knob)
    return knob


def with_overencoding(base, rho: float) -> ml_collections.ConfigDict:
    target = sizing.accounting(sizing.moe_baseline(base))
    c = _fewer_experts(base, rho)
    o = c.model.overencoding
    o.enabled = True
    o.base_rows = 2
    _pay_activated(c, target.activated_params, "overencoding")
    _solve_linear(c, lambda rows: setattr(o, "base_rows", rows), target.total_params, 2)
    return c


def with_ple(base, rho: float) -> ml_collections.ConfigDict:
    target = sizing.accounting(sizing.moe_baseline(base))
    c = _fewer_experts(base, rho)
    budget = target.total_params - sizing.accounting(c).total_params
    p = c.model.ple
    p.enabled = True
    # A table of one row per token at the widest per-layer vector the budget allows.
    p.width = max(1, budget // (c.model.vocab_size * c.model.num_layers))
    p.table_rows = c.model.vocab_size
    _pay_activated(c, target.activated_params, "ple")
    _solve_linear(c, lambda rows: setattr(p, "table_rows", rows), target.total_params, 1)
    return c


def with_ultramem(base, rho: float) -> ml_collections.ConfigDict:
    target = sizing.accounting(sizing.moe_baseline(base))
    best = None
    u = base.model.ultramem
    step = 2 if u.value_expansion % 4 == 0 else u.value_expansion
    for n in range(max(u.candidates, step), 4097, step):
        if (n * n) % u.value_expansion:
            continue
        c = _fewer_experts(base, rho)
        c.model.ultramem.layer_ids = tuple(base.model.engram.layer_ids) or (1,)
        c.model.ultramem.grid_size = n
        try:
            _pay_activated(c, target.activated_params, "ultramem")
        except ValueError:
            break  # larger grids activate more keys still
        gap = abs(sizing.accounting(c).total_params - target.total_params)
        if best is None or gap < best[0]:
            best = (gap, c)
        elif sizing.accounting(c).total_params > target.total_params:
            break
    if best is None:
        raise ValueError("memory_variants(ultramem): no grid size fits the parameter budget")
    return best[1]


def variant_config(base: ml_collections.ConfigDict, variant: str, rho: float):
    if variant == "moe":
        return sizing.moe_baseline(base)
    if variant == "engram":
        return sizing.with_allocation(base, rho)
    builders = {"overencoding": with_overencoding, "ple": with_ple, "ultramem": with_ultramem}
    if variant not in builders:
        raise ValueError(f"variant: got {variant!r}; expected one of {VARIANTS}")
    return builders[variant](copy.deepcopy(base), rho)


def memory_params(acc) -> int:
    """Parameters of the memory itself (tables, projections, keys, values)."""
    prefixes = ("engram", "overencoding", "ple", "ultramem")
    return sum(c.params for c in acc.breakdown if c.name.startswith(prefixes))


def build_specs(
    options: Options, corpus: Corpus, base: ml_collections.ConfigDict, rho: float
) -> list[runner.RunSpec]:
    models = {variant: variant_config(base, variant, rho) for variant in VARIANTS}
    specs = []
    for seed in range(options.seeds):
        for variant, model in models.items():
            config = runner.training_config(model, options, corpus, seed=seed)
            labels = {"variant": variant, "memory_params": memory_params(sizing.accounting(model))}
            specs.append(runner.RunSpec(f"{variant}-s{seed}", seed, config, labels))
    return specs


def _knob(config: ml_collections.ConfigDict, variant: str) -> str:
    m = config.model
    return {
        "moe": "-",
        "engram": f"table_rows_per_head={tuple(m.engram.table_rows_per_head)}",
        "overencoding": f"base_rows={m.overencoding.base_rows}",
        "ple": f"width={m.ple.width}, table_rows={m.ple.table_rows}",
        "ultramem": f"grid_size={m.ultramem.grid_size}",
    }[variant]


def report_runs(outcome: runner.Outcome, rho: float) -> None:
    title = "MoE vs Engram, OverEncoding, PLE and UltraMem on MoE at matched parameters"
    lines, extra = report.header(outcome, title, NAME)
    runs = outcome.runs
    by_variant = report.group(runs, "variant")
    floor = extra["compression_floors"]["evaluated"]
    curves_png, bpb_png = iso_param.loss_plots(outcome.options, by_variant, floor)
    lines += [
        f"Every memory keeps the MoE baseline's total and activated parameters: routed experts "
        f"shrink to rho = {rho} of the unused ones, the memory's activated parameters come out "
        "of the dense FFN width, its unread parameters are sized to the freed budget.",
        "",
        *report.accounting_table(runs, "variant"),
        "",
        *report.budget_table(runs, "variant"),
        "",
        "| variant | sized by | memory params | mlp_hidden_size | routed experts | seeds | "
        "final eval loss | bits/byte | wall time per run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    config_by_name = {s.name: s.config for s in outcome.specs}
    for variant, members in by_variant.items():
        cfg = config_by_name[members[0]["name"]]
        walls = [r["wall_seconds"] for r in members if r["wall_seconds"]]
        wall = f"{sum(walls) / len(walls):.0f} s" if walls else "-"
        lines.append(
            f"| {variant} | {_knob(cfg, variant)} | {members[0]['memory_params']:,} | "
            f"{cfg.model.mlp_hidden_size} | {cfg.model.moe.num_experts} | "
            f"{report.loss_columns(members)} | {wall} |"
        )
    comparisons = [(variant, "moe") for variant in by_variant if variant != "moe"]
    lines += [
        "",
        *report.paired_lines(runs, "variant", comparisons),
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
    options, base, corpus, _, held_out = runner.start(base_config())
    specs = build_specs(options, corpus, base, rho)
    outcome = runner.run_all(options, corpus, held_out, specs, lambda s: s.labels["variant"])
    report_runs(outcome, rho)


if __name__ == "__main__":
    from absl import flags

    from engram_jax import cli
    from engram_jax.experiments.options import define_flags

    define_flags(default_steps=600, default_seeds=3)
    flags.DEFINE_float("rho", 0.75, "Routed-expert share of the sparse budget for every memory.")
    cli.run(main)
