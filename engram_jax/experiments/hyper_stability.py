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
from typing import Any

import ml_collections
import numpy as np

from engram_jax.config import base_config as schema_base
from engram_jax.experiments import common

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
    """A deep, narrow dense model (12 layers of width 64, 4 streams, no Engram, no MoE) at a
    learning rate well above the tiny config's (so that an unconstrained mixing can drift)."""
    c = schema_base()
    c.batch_size = 16
    c.seq_len = 128
    c.learning_rate = 1e-2
    c.warmup_steps = 20
    c.log_every = 5
    m = c.model
    m.vocab_size = 4096
    m.num_layers = 12
    m.hidden_size = 64
    m.mlp_hidden_size = 192
    m.num_dense_layers = 12
    m.attention.num_heads = 2
    m.attention.num_kv_heads = 1
    m.attention.head_dim = 32
    m.moe.num_experts = 0
    m.engram.layer_ids = ()
    m.hc.n_streams = 4
    return c


def kind_config(base: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
    if kind not in KINDS:
        raise ValueError(f"--kinds: got {kind!r}; expected some of {', '.join(KINDS)}")
    c = copy.deepcopy(base)
    c.model.hc.kind = kind
    if kind == "residual":
        c.model.hc.n_streams = 1
    return c


def build_specs(
    options: common.Options,
    corpus: common.Corpus,
    base: ml_collections.ConfigDict,
    kinds: list[str],
) -> list[common.RunSpec]:
    specs = []
    for seed in range(options.seeds):
        for kind in kinds:
            config = common.training_config(kind_config(base, kind), options, corpus, seed=seed)
            specs.append(common.RunSpec(f"{kind}-s{seed}", seed, config, {"kind": kind}))
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


def stability_table(by_kind: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown rows per kind: loss, bits/byte, divergences, gradient norm, final gains."""
    lines = [
        "| kind | seeds | diverged | final eval loss | bits/byte | max grad norm | composite gain "
        "fwd / bwd (final) | column error (final) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(values: list[float | None], spec: str = ".3g") -> str:
        values = [v for v in values if v is not None]
        return "-" if not values else format(max(values), spec)

    for kind, members in by_kind.items():
        loss = common.mean_std([r["final_eval_loss"] for r in members])
        bpb = common.mean_std([r["eval_bits_per_byte"] for r in members])
        lines.append(
            f"| {kind} | {len(members)} | {sum(bool(r['diverged']) for r in members)} | "
            f"{loss[0]:.4f} ± {loss[1]:.4f} | "
            f"{bpb[0]:.4f} ± {bpb[1]:.4f} | {fmt([r['max_grad_norm'] for r in members])} | "
            f"{fmt([r['final_hc_max_composite_forward_gain'] for r in members])} / "
            f"{fmt([r['final_hc_max_composite_backward_gain'] for r in members])} | "
            f"{fmt([r['final_hc_col_sum_err'] for r in members])} |"
        )
    return lines


def report(
    options: common.Options,
    corpus: common.Corpus,
    held_out: list[str],
    specs: list[common.RunSpec],
    runs: list[dict[str, Any]],
) -> None:
    workdir = options.workdir
    eval_tokens = common.evaluated_tokens(specs[0].config)
    compression = common.floors_for(held_out, corpus, eval_tokens)
    by_kind = common.group(runs, "kind")
    add_stability_finals(workdir, runs)
    lr = specs[0].config.learning_rate
    title = f"Hyper-connection stability at learning rate {lr:g}"
    png = stability_figure(workdir, by_kind, title, "hyper_stability.png")

    lines = common.summary_header(
        "Hyper-connection stability: residual, HC, mHC, mHC-lite",
        NAME,
        options,
        corpus,
        eval_tokens,
        compression,
    )
    cfg = specs[0].config.model
    lines += [
        f"Model: {cfg.num_layers} layers of width {cfg.hidden_size}, learning rate {lr:g}, "
        f"gradient clip {specs[0].config.clip_norm:g}. Diagnostics are measured on the first "
        "evaluation batch at every evaluation (`hc_*` keys of metrics.jsonl).",
        "",
        *common.accounting_table(runs, "kind"),
        "",
        *stability_table(by_kind),
    ]
    lines += ["", f"![stability]({png})", ""]
    common.write_summary(workdir, lines)
    common.write_results(
        workdir,
        NAME,
        runs,
        learning_rate=lr,
        eval_tokens=eval_tokens,
        compression_floors=compression,
    )


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    options = common.Options.from_flags()
    kinds = [k.strip() for k in flags.FLAGS.kinds.split(",") if k.strip()]
    base = base_config()
    base.learning_rate = flags.FLAGS.learning_rate
    common.apply_overrides(base, options.overrides)
    corpus, _, held_out = common.setup(options, base)
    specs = build_specs(options, corpus, base, kinds)
    common.print_configs(specs, lambda s: s.labels["kind"])
    runs = common.run_experiment(options.workdir, specs, options.jobs, allow_divergence=True)
    report(options, corpus, held_out, specs, runs)
    print(f"wrote {options.workdir}/{common.RESULTS_FILE} and {common.SUMMARY_FILE}", flush=True)


if __name__ == "__main__":
    from absl import app, flags

    common.define_flags(default_steps=400, default_seeds=1)
    flags.DEFINE_float("learning_rate", 1e-2, "Peak learning rate of every run.")
    flags.DEFINE_string("kinds", ",".join(KINDS), "Hyper-connection kinds to compare.")
    app.run(main)
