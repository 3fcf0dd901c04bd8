"""Residual vs HC vs mHC vs mHC-lite on a deeper, narrower model at a high learning rate.

    python -m engram_jax.experiments.hyper_stability --data_path=PATH --workdir=DIR --steps=N \
        --seeds=K [--jobs=J] [--learning_rate=0.01] [--kinds=residual,hc,mhc,mhc_lite]

Unconstrained hyper-connections (HC) let the product of the residual mixing matrices grow with
depth; mHC keeps each one doubly stochastic (Sinkhorn), mHC-lite a convex mix of permutations
(exactly doubly stochastic). The trainer logs, at every evaluation, the composite Amax gains from
the bottom site to the top (forward: largest row sum; backward: largest column sum,
docs/design.md §2.6), the worst column-sum error and the logits' spread; this experiment plots them
with the training loss and gradient norm. Mirrors the mHC paper's stability figures (loss and
grad-norm curves of HC vs mHC, composite Amax gain near 3000 for HC vs about 1.6 for mHC).
Parameters differ slightly between kinds (the mixing coefficients); the accounting is printed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from engram_jax import config as config_lib
from engram_jax.experiments import report, runner
from engram_jax.experiments.heldout import Corpus
from engram_jax.experiments.options import Options, shipped_config

NAME = "hyper_stability"
KINDS = ("residual", "hc", "mhc", "mhc_lite")
# (metrics.jsonl key, axis label, log scale)
PANELS = (
    ("train_loss", "training loss", False),
    ("grad_norm", "gradient norm (before clipping)", True),
    ("hc_max_composite_forward_gain", "composite Amax gain, forward (max over sites)", True),
    ("hc_max_composite_backward_gain", "composite Amax gain, backward (max over sites)", True),
    ("hc_col_sum_err", "max |column sum - 1| of H_res", True),
    ("hc_res_logit_spread", "max logit spread (mHC, mHC-lite)", False),
)


def base_config() -> ml_collections.ConfigDict:
    """The shipped `tiny` config's data, batch and mHC (4 streams), made a deep, narrow dense
    model (12 layers of width 64, no Engram, no MoE) at a learning rate well above tiny's (so
    that an unconstrained mixing can drift)."""
    c = shipped_config("tiny")
    changes = {
        "learning_rate": 1e-2,
        "warmup_steps": 20,
        "log_every": 5,
        "model": {
            "num_layers": 12,
            "hidden_size": 64,
            "mlp_hidden_size": 192,
            "num_dense_layers": 12,
            "attention": {"num_heads": 2, "num_kv_heads": 1},
            "moe": {"num_experts": 0},
            "engram": {"layer_ids": ()},
        },
    }
    config_lib.apply_values(c, changes, "hyper_stability.base_config")
    return c


def kind_config(
    base: ml_collections.ConfigDict, kind: str, kinds: tuple[str, ...] = KINDS
) -> ml_collections.ConfigDict:
    """`base` with `hc.kind = kind`, one of `kinds` (the residual keeps one stream)."""
    if kind not in kinds:
        raise ValueError(f"--kinds: got {kind!r}; expected some of {', '.join(kinds)}")
    c = copy.deepcopy(base)
    c.model.hc.kind = kind
    if kind == "residual":
        c.model.hc.n_streams = 1
    return c


def build_specs(
    options: Options,
    corpus: Corpus,
    base: ml_collections.ConfigDict,
    kinds: list[str],
) -> list[runner.RunSpec]:
    specs = []
    for seed in range(options.seeds):
        for kind in kinds:
            config = runner.training_config(kind_config(base, kind), options, corpus, seed=seed)
            specs.append(runner.RunSpec(f"{kind}-s{seed}", seed, config, {"kind": kind}))
    return specs


def _final(workdir: str, run: dict[str, Any], key: str) -> float | None:
    from engram_jax.experiments import plots

    steps, values = plots.metric_curve(workdir, run, key)
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else None


def add_stability_finals(workdir: str, runs: list[dict[str, Any]]) -> None:
    """Adds each run's largest gradient norm and final diagnostics (`final_hc_*`) to its record."""
    from engram_jax.experiments import plots

    for run in runs:
        grad_norms = plots.metric_curve(workdir, run, "grad_norm")[1]
        run["max_grad_norm"] = float(grad_norms.max()) if grad_norms.size else None
        for key in (
            "hc_max_composite_forward_gain",
            "hc_max_composite_backward_gain",
            "hc_col_sum_err",
            "hc_res_logit_spread",
        ):
            run[f"final_{key}"] = _final(workdir, run, key)


def stability_figure(
    workdir: str, by_kind: dict[str, list[dict[str, Any]]], title: str, filename: str
) -> str:
    """The six PANELS, one seed band per kind; returns the PNG's name."""
    from engram_jax.experiments import plots

    fig, axes = plots.new_figure(5.2, 3.6, ncols=3, nrows=2)
    for ax, (key, label, log) in zip(axes.flat, PANELS, strict=True):
        drawn = False
        for i, (kind, members) in enumerate(by_kind.items()):
            drawn |= plots.seed_band(ax, workdir, members, key, kind, color=f"C{i}")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        if log and drawn:
            ax.set_yscale("log")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged by these kinds", ha="center", transform=ax.transAxes)
    fig.suptitle(title)
    return plots.save(fig, workdir, filename)


def _largest(values: list[float | None], spec: str = ".3g") -> str:
    values = [v for v in values if v is not None]
    return "-" if not values else format(max(values), spec)


def stability_table(by_kind: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown rows per kind: loss, bits/byte, divergences, gradient norm, final gains."""
    lines = [
        "| kind | seeds | final eval loss | bits/byte | diverged | max grad norm | composite gain "
        "fwd / bwd (final) | column error (final) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, members in by_kind.items():
        lines.append(
            f"| {kind} | {report.loss_columns(members)} | "
            f"{sum(bool(r['diverged']) for r in members)} | "
            f"{_largest([r['max_grad_norm'] for r in members])} | "
            f"{_largest([r['final_hc_max_composite_forward_gain'] for r in members])} / "
            f"{_largest([r['final_hc_max_composite_backward_gain'] for r in members])} | "
            f"{_largest([r['final_hc_col_sum_err'] for r in members])} |"
        )
    return lines


def report_runs(outcome: runner.Outcome) -> None:
    title = "Hyper-connection stability: residual, HC, mHC, mHC-lite"
    lines, extra = report.header(outcome, title, NAME)
    options, specs, runs = outcome.options, outcome.specs, outcome.runs
    add_stability_finals(options.workdir, runs)
    by_kind = report.group(runs, "kind")
    lr = specs[0].config.learning_rate
    title = f"Hyper-connection stability at learning rate {lr:g}"
    png = stability_figure(options.workdir, by_kind, title, "hyper_stability.png")
    cfg = specs[0].config.model
    lines += [
        f"Model: {cfg.num_layers} layers of width {cfg.hidden_size}, learning rate {lr:g}, "
        f"gradient clip {specs[0].config.clip_norm:g}. Diagnostics are measured on the first "
        "evaluation batch at every evaluation (`hc_*` keys of metrics.jsonl).",
        "",
        *report.accounting_table(runs, "kind"),
        "",
        *stability_table(by_kind),
    ]
    kinds = list(by_kind)
    pairs = [(kind, kinds[0]) for kind in kinds[1:]]
    lines += ["", *report.paired_lines(runs, "kind", pairs), "", f"![stability]({png})", ""]
    report.finish(options.workdir, NAME, lines, runs, learning_rate=lr, **extra)


def run_kinds(
    build: Callable[[Options, Corpus, ml_collections.ConfigDict, list[str]], list[runner.RunSpec]],
    describe: Callable[[runner.RunSpec], str],
) -> runner.Outcome:
    """Trains the runs `build` makes for `--kinds` on this experiment's model at
    `--learning_rate` (divergence is a result here, not an error); residual_variants shares it."""
    from absl import flags

    base = base_config()
    base.learning_rate = flags.FLAGS.learning_rate
    options, base, corpus, _, held_out = runner.start(base)
    kinds = [k.strip() for k in flags.FLAGS.kinds.split(",") if k.strip()]
    specs = build(options, corpus, base, kinds)
    return runner.run_all(options, corpus, held_out, specs, describe, allow_divergence=True)


def main(argv: list[str]) -> None:
    del argv
    report_runs(run_kinds(build_specs, lambda s: s.labels["kind"]))


if __name__ == "__main__":
    from absl import flags

    from engram_jax import cli
    from engram_jax.experiments.options import define_flags

    define_flags(default_steps=400, default_seeds=1)
    flags.DEFINE_float("learning_rate", 1e-2, "Peak learning rate of every run.")
    flags.DEFINE_string("kinds", ",".join(KINDS), "Hyper-connection kinds to compare.")
    cli.run(main)
