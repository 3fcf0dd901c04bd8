"""Residual vs HC vs mHC vs mHC-lite vs AltUp at equal parameters, with the stability figures.

    python -m engram_jax.experiments.residual_variants --data_path=PATH --workdir=DIR --steps=N \
        --seeds=K [--jobs=J] [--learning_rate=0.01] [--kinds=residual,hc,mhc,mhc_lite,altup]

Every kind is one value of `model.hc.kind` on the same deep, narrow model as hyper_stability
(12 layers of width 64, 4 streams / AltUp blocks). The kinds differ in their own parameters
(mixing coefficients; AltUp's stream projections), so each run's dense FFN width is set to the
largest `mlp_hidden_size` whose total parameters do not exceed the largest kind's at the base
width: totals then agree to within one FFN unit (3 x D x L parameters), which the accounting
table in summary.md shows. AltUp's prediction operator is the linear map it applies to the
residual, so the same composite Amax gains are drawn for it (docs/design.md "AltUp").
"""

from __future__ import annotations

import ml_collections

from engram_jax.accounting import account
from engram_jax.config import validate
from engram_jax.experiments import hyper_stability, report, runner
from engram_jax.experiments.heldout import Corpus
from engram_jax.experiments.options import Options

NAME = "residual_variants"
KINDS = ("residual", "hc", "mhc", "mhc_lite", "altup")
# The widest FFN searched when matching parameters, as a multiple of the base width.
_MAX_WIDTH_FACTOR = 8


def base_config() -> ml_collections.ConfigDict:
    """hyper_stability's deep, narrow dense model at its high learning rate."""
    return hyper_stability.base_config()


def kind_config(base: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
    """`base` with `hc.kind = kind` (the residual keeps one stream), AltUp among the kinds."""
    return hyper_stability.kind_config(base, kind, KINDS)


def _total_params(config: ml_collections.ConfigDict) -> int:
    return account(validate(config).model, config.seq_len).total_params


def match_parameters(configs: dict[str, ml_collections.ConfigDict]) -> dict[str, int]:
    """Sets each config's `mlp_hidden_size` so that totals match the largest one's (within one
    FFN unit, from below); returns the chosen widths."""
    target = max(_total_params(c) for c in configs.values())
    widths = {}
    for kind, config in configs.items():
        base_width = config.model.mlp_hidden_size
        lo, hi = base_width, base_width * _MAX_WIDTH_FACTOR
        while lo < hi:  # the largest width whose total is <= target (totals grow with width)
            mid = (lo + hi + 1) // 2
            config.model.mlp_hidden_size = mid
            lo, hi = (mid, hi) if _total_params(config) <= target else (lo, mid - 1)
        config.model.mlp_hidden_size = lo
        widths[kind] = lo
    return widths


def build_specs(
    options: Options,
    corpus: Corpus,
    base: ml_collections.ConfigDict,
    kinds: list[str],
) -> list[runner.RunSpec]:
    configs = {kind: kind_config(base, kind) for kind in kinds}
    match_parameters(configs)
    specs = []
    for seed in range(options.seeds):
        for kind in kinds:
            config = runner.training_config(configs[kind], options, corpus, seed=seed)
            labels = {"kind": kind, "mlp_hidden_size": config.model.mlp_hidden_size}
            specs.append(runner.RunSpec(f"{kind}-s{seed}", seed, config, labels))
    return specs


def report_runs(outcome: runner.Outcome) -> None:
    title = "Residual variants: residual, HC, mHC, mHC-lite, AltUp at equal parameters"
    lines, extra = report.header(outcome, title, NAME)
    options, specs, runs = outcome.options, outcome.specs, outcome.runs
    hyper_stability.add_stability_finals(options.workdir, runs)
    by_kind = report.group(runs, "kind")
    lr = specs[0].config.learning_rate
    figure_title = f"Residual variants at equal parameters, learning rate {lr:g}"
    png = hyper_stability.stability_figure(
        options.workdir, by_kind, figure_title, "residual_variants.png"
    )
    cfg = specs[0].config.model
    widths = ", ".join(f"{k} {m[0]['mlp_hidden_size']}" for k, m in by_kind.items())
    kinds = list(by_kind)
    pairs = [(kind, kinds[0]) for kind in kinds[1:]]
    lines += [
        f"Model: {cfg.num_layers} layers of width {cfg.hidden_size}, {cfg.hc.n_streams} streams "
        f"(AltUp: blocks), learning rate {lr:g}, gradient clip {specs[0].config.clip_norm:g}. "
        f"Dense FFN width per kind, chosen to equalise total parameters: {widths}. AltUp's "
        "diagnostics are those of its prediction operators (one site per layer).",
        "",
        *report.accounting_table(runs, "kind"),
        "",
        *hyper_stability.stability_table(by_kind),
        "",
        *report.paired_lines(runs, "kind", pairs),
        "",
        f"![stability]({png})",
        "",
    ]
    report.finish(options.workdir, NAME, lines, runs, learning_rate=lr, **extra)


def main(argv: list[str]) -> None:
    del argv
    describe = lambda s: f"{s.labels['kind']} (FFN {s.labels['mlp_hidden_size']})"
    report_runs(hyper_stability.run_kinds(build_specs, describe))


if __name__ == "__main__":
    from absl import flags

    from engram_jax import cli
    from engram_jax.experiments.options import define_flags

    define_flags(default_steps=400, default_seeds=1)
    flags.DEFINE_float("learning_rate", 1e-2, "Peak learning rate of every run.")
    flags.DEFINE_string("kinds", ",".join(KINDS), "Residual kinds to compare.")
    cli.run(main)
