"""Engram + MoE against an MoE and a dense model at matched parameters.

    python -m engram_jax.experiments.iso_param --data_path=PATH --workdir=DIR --steps=N --seeds=K \
        [--jobs=J] [--rho=0.75]

The MoE baseline and Engram + MoE have equal total and activated parameters (Engram takes
1 - rho of the sparse budget from the routed experts, docs/design.md §1.9); the dense model has
the same activated parameters (a dense model's total equals its activated count). Mirrors the
Engram paper's Dense-4B / MoE-27B / Engram-27B comparison at a scale that fits one machine.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from engram_jax.config import base_config as schema_base
from engram_jax.experiments import common, sizing

NAME = "iso_param"
VARIANTS = ("dense", "moe", "engram")


def base_config() -> ml_collections.ConfigDict:
    """The sparse model every Engram experiment starts from (~1M activated parameters without
    the embeddings): 4 layers of width 128, 1 dense + 3 MoE layers (16 routed experts, top-2,
    1 shared), mHC with 4 streams, and the Engram layout (one layer, orders 2-3, 4 heads each,
    row width 8) that `sizing.with_allocation` fills with table rows."""
    c = schema_base()
    c.batch_size = 16
    c.seq_len = 128
    c.learning_rate = 3e-3
    c.warmup_steps = 50
    c.log_every = 10
    m = c.model
    m.vocab_size = 4096
    m.num_layers = 4
    m.hidden_size = 128
    m.mlp_hidden_size = 384
    m.num_dense_layers = 1
    m.attention.num_heads = 4
    m.attention.num_kv_heads = 2
    m.attention.head_dim = 32
    m.moe.num_experts = 16
    m.moe.num_shared_experts = 1
    m.moe.top_k = 2
    m.moe.expert_hidden_size = 64
    m.engram.layer_ids = (1,)
    m.engram.max_ngram = 3
    m.engram.heads_per_ngram = 4
    m.engram.embed_per_ngram = 32
    m.hc.kind = "mhc"
    m.hc.n_streams = 4
    return c


def variant_config(base: ml_collections.ConfigDict, variant: str, rho: float):
    if variant == "dense":
        return sizing.dense_twin(base)
    if variant == "moe":
        return sizing.moe_baseline(base)
    if variant == "engram":
        return sizing.with_allocation(base, rho)
    raise ValueError(f"variant: got {variant!r}; expected one of {VARIANTS}")


def build_specs(
    options: common.Options, corpus: common.Corpus, base: ml_collections.ConfigDict, rho: float
) -> list[common.RunSpec]:
    specs = []
    for seed in range(options.seeds):
        for variant in VARIANTS:
            model = variant_config(base, variant, rho)
            config = common.training_config(model, options, corpus, seed=seed)
            specs.append(common.RunSpec(f"{variant}-s{seed}", seed, config, {"variant": variant}))
    return specs


def report(
    options: common.Options,
    corpus: common.Corpus,
    held_out: list[str],
    specs: list[common.RunSpec],
    runs: list[dict[str, Any]],
    rho: float,
) -> None:
    from engram_jax.experiments import plots

    workdir = options.workdir
    eval_tokens = common.evaluated_tokens(specs[0].config)
    compression = common.floors_for(held_out, corpus, eval_tokens)
    by_variant = common.group(runs, "variant")

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
    stats = [common.mean_std([r["eval_bits_per_byte"] for r in by_variant[n]]) for n in names]
    ax.bar(names, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=6, color="C0")
    ev = compression["evaluated"]
    ax.axhline(ev["xz_9e"], color="C3", linestyle="--", label=f"xz -9e {ev['xz_9e']:.3f}")
    ax.axhline(ev["bzip2_9"], color="C2", linestyle=":", label=f"bzip2 -9 {ev['bzip2_9']:.3f}")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Final bits per byte (mean, sample std over seeds)")
    ax.legend()
    bpb_png = plots.save(fig, workdir, "final_bits_per_byte.png")

    lines = common.summary_header(
        "Engram + MoE vs MoE vs dense at matched parameters",
        NAME,
        options,
        corpus,
        eval_tokens,
        compression,
    )
    lines += [
        f"MoE and Engram + MoE (rho = {rho}) have equal total and activated parameters; the "
        "dense model matches the activated count only. Engram's activated projections are paid "
        "for by a narrower dense FFN layer (`mlp_hidden_size` below).",
        "",
        *common.accounting_table(runs, "variant"),
        "",
        "| variant | mlp_hidden_size | routed experts | seeds | final eval loss | bits/byte | "
        "wall time per run |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    config_by_name = {s.name: s.config for s in specs}
    for variant, members in by_variant.items():
        cfg = config_by_name[members[0]["name"]]
        loss = common.mean_std([r["final_eval_loss"] for r in members])
        bpb = common.mean_std([r["eval_bits_per_byte"] for r in members])
        walls = [r["wall_seconds"] for r in members if r["wall_seconds"]]
        wall = f"{sum(walls) / len(walls):.0f} s" if walls else "-"
        lines.append(
            f"| {variant} | {cfg.model.mlp_hidden_size} | {cfg.model.moe.num_experts} | "
            f"{len(members)} | {loss[0]:.4f} ± {loss[1]:.4f} | {bpb[0]:.4f} ± {bpb[1]:.4f} | "
            f"{wall} |"
        )
    lines += [
        "",
        f"![validation curves]({curves_png})",
        "",
        f"![final bits per byte]({bpb_png})",
        "",
    ]
    common.write_summary(workdir, lines)
    common.write_results(
        workdir, NAME, runs, rho=rho, eval_tokens=eval_tokens, compression_floors=compression
    )


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    options = common.Options.from_flags()
    rho = flags.FLAGS.rho
    base = base_config()
    common.apply_overrides(base, options.overrides)
    corpus, _, held_out = common.setup(options, base)
    specs = build_specs(options, corpus, base, rho)
    common.print_configs(specs, lambda s: s.labels["variant"])
    runs = common.run_experiment(options.workdir, specs, options.jobs)
    report(options, corpus, held_out, specs, runs, rho)
    print(f"wrote {options.workdir}/{common.RESULTS_FILE} and {common.SUMMARY_FILE}", flush=True)


if __name__ == "__main__":
    from absl import flags

    from engram_jax import cli

    common.define_flags(default_steps=600, default_seeds=3)
    flags.DEFINE_float("rho", 0.75, "Routed-expert share of the sparse budget in Engram + MoE.")
    cli.run(main)
