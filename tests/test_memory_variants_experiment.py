"""`python -m engram_jax.experiments.memory_variants` end to end at micro budget on a small text
file: five runs at matched parameters, results.json, PNGs and summary.md."""

from __future__ import annotations

from tests.test_experiments import _micro, _results, _run, _write_corpus  # noqa: F401 (conftest corpus)

# The micro model's dense FFN can pay for an UltraMem layout this small only.
SMALL_MEMORIES = (
    "model.ultramem.key_dim=4",
    "model.ultramem.value_width=8",
    "model.ultramem.value_expansion=2",
    "model.ultramem.top_k=4",
    "model.ultramem.candidates=4",
    "model.ple.width=4",
)


def test_memory_variants_match_parameters_end_to_end(corpus, tmp_path):
    workdir = str(tmp_path)
    _run("memory_variants", corpus, workdir, *_micro(*SMALL_MEMORIES), jobs=2)
    names = ["moe-s0", "engram-s0", "overencoding-s0", "ple-s0", "ultramem-s0"]
    results = _results(
        workdir, "memory_variants", names, ["validation_curves.png", "final_bits_per_byte.png"]
    )
    runs = {r["variant"]: r for r in results["runs"]}
    moe = runs["moe"]
    d = 32
    for variant in ("engram", "overencoding", "ple", "ultramem"):
        run = runs[variant]
        # Equal totals (tables come in whole rows, UltraMem grids in steps of 2 keys) and equal
        # activated parameters (the dense FFN width moves in units of 3 x D).
        assert abs(run["total_params"] - moe["total_params"]) <= 0.01 * moe["total_params"]
        assert abs(run["activated_params"] - moe["activated_params"]) <= 3 * d, variant
        assert run["memory_params"] > 0, variant
    assert moe["memory_params"] == 0
    assert results["compression_floors"]["evaluated"]["xz_9e"] > 0
