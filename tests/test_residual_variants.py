"""engram_jax.experiments.residual_variants end to end at a micro budget, and its parameter
matching exactly."""

from __future__ import annotations

from engram_jax.accounting import account
from engram_jax.config import validate
from engram_jax.experiments import residual_variants

# `_write_corpus` fills conftest's module-scoped `corpus` fixture.
from tests.test_experiments import (  # noqa: F401
    _micro_overrides,
    _results,
    _run,
    _write_corpus,
)

MICRO = _micro_overrides(num_layers=2)


def test_parameters_match_within_one_ffn_unit():
    base = residual_variants.base_config()
    configs = {k: residual_variants.kind_config(base, k) for k in residual_variants.KINDS}
    totals_before = {k: account(validate(c).model, 8).total_params for k, c in configs.items()}
    widths = residual_variants.match_parameters(configs)
    m = base.model
    unit = 3 * m.hidden_size * m.num_layers  # parameters of one more FFN hidden unit
    totals = {k: account(validate(c).model, 8).total_params for k, c in configs.items()}
    target = max(totals_before.values())
    for kind, total in totals.items():
        assert target - unit < total <= target, kind
    assert widths["residual"] > m.mlp_hidden_size  # the smallest kind gets the widest FFN
    assert len(set(totals_before.values())) > 1  # matching had something to do


def test_residual_variants_end_to_end(corpus, tmp_path):
    workdir = str(tmp_path)
    _run("residual_variants", corpus, workdir, *[f"--set={h}" for h in MICRO], jobs=2)
    results = _results(
        workdir,
        "residual_variants",
        ["residual-s0", "hc-s0", "mhc-s0", "mhc_lite-s0", "altup-s0"],
        ["residual_variants.png"],
    )
    runs = {r["kind"]: r for r in results["runs"]}
    totals = [r["total_params"] for r in runs.values()]
    assert max(totals) - min(totals) < 3 * 32 * 2  # equal within one FFN unit
    assert runs["residual"]["final_hc_max_composite_forward_gain"] is None
    for kind in ("hc", "mhc", "mhc_lite", "altup"):
        assert runs[kind]["final_hc_max_composite_forward_gain"] > 0, kind
        assert runs[kind]["max_grad_norm"] > 0
    assert runs["mhc_lite"]["final_hc_col_sum_err"] < 1e-5
