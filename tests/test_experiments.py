"""engram_jax.experiments end to end at a micro budget, and their pure parts exactly.

Each experiment runs as the user runs it (`python -m engram_jax.experiments.<name>`) on a small
text file written here, with micro models and 3 steps per run. The iso-parameter, allocation and
gate-analysis experiments use the same micro sparse model, so the allocation and gate runs at
rho = 1 and rho = 0.75 are the iso-parameter runs' programs: the persistent compilation cache
(tests/conftest.py) compiles each once. The subprocesses compile at XLA's lowest optimisation
level (what is tested here is the experiment machinery, not the kernels' speed).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import matplotlib.image
import ml_collections
import numpy as np
import pytest

from engram_jax import config as config_lib
from engram_jax import corpus as corpus_lib
from engram_jax import data as data_lib
from engram_jax.experiments import common, gate_analysis, iso_param, sizing
from engram_jax.experiments.floors import bits_per_byte

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
_PHRASES = [
    "the memory table maps every suffix ngram to a row",
    "the gate decides how much of it to use",
    "attention mixes the context of earlier tokens",
    "named entities such as Alexander the Great and the Milky Way",
    "formulaic phrases are recalled in one lookup",
    "the hidden state of each position",
]
# The micro sparse model: 2 layers (1 dense, 1 MoE with 6 experts), width 32, 2 streams.
MICRO = [
    "model.vocab_size=320",
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.mlp_hidden_size=64",
    "model.attention.num_heads=2",
    "model.attention.num_kv_heads=1",
    "model.attention.head_dim=16",
    "model.moe.num_experts=6",
    "model.moe.expert_hidden_size=16",
    "model.engram.heads_per_ngram=2",
    "model.engram.embed_per_ngram=16",
    "model.hc.kind=residual",
    "model.hc.n_streams=1",
    "batch_size=4",
    "seq_len=32",
]
RUN_KEYS = {
    "name",
    "seed",
    "total_params",
    "activated_params",
    "final_eval_loss",
    "eval_bits_per_byte",
}


def _write_corpus(path: str) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(100):
            picks = rng.choice(len(_PHRASES), size=int(rng.integers(3, 7)))
            # Documents are separated by two blank lines.
            f.write(". ".join(_PHRASES[i] for i in picks) + ".\n\n\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("corpus") / "corpus.txt")
    _write_corpus(path)
    return path


def _run(name: str, corpus: str, workdir: str, *extra: str, jobs: int = 1) -> str:
    env = dict(os.environ)
    fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {fast}".strip()
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO] + ([env["PYTHONPATH"]] if "PYTHONPATH" in env else [])
    )
    command = [
        sys.executable,
        "-m",
        f"engram_jax.experiments.{name}",
        f"--data_path={corpus}",
        f"--workdir={workdir}",
        f"--steps={STEPS}",
        "--seeds=1",
        f"--jobs={jobs}",
        "--eval_tokens=128",
        "--evals=3",
        *extra,
    ]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _micro(*items: str) -> list[str]:
    return [f"--set={item}" for item in [*MICRO, *items]]


def _results(workdir: str, experiment: str, names: list[str], pngs: list[str]) -> dict:
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert results["experiment"] == experiment
    assert [r["name"] for r in results["runs"]] == names
    for run in results["runs"]:
        assert set(run) >= RUN_KEYS, run
        assert run["total_params"] >= run["activated_params"] > 0
        assert math.isfinite(run["final_eval_loss"]) and run["final_eval_loss"] > 0
        assert 0 < run["eval_bits_per_byte"] < 20
    for png in pngs:
        path = os.path.join(workdir, png)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({png})" in _read(os.path.join(workdir, "summary.md"))
    return results


@pytest.fixture(scope="module")
def iso_workdir(corpus, tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("iso_param"))
    _run("iso_param", corpus, workdir, *_micro(), jobs=2)
    return workdir


# ------------------------------------------------------------------------ experiments end to end


def test_iso_param_matches_parameters_and_skips_finished_runs(iso_workdir, corpus):
    results = _results(
        iso_workdir,
        "iso_param",
        ["dense-s0", "moe-s0", "engram-s0"],
        ["validation_curves.png", "final_bits_per_byte.png"],
    )
    dense, moe, engram = results["runs"]
    # Equal total and activated parameters for MoE and Engram + MoE (tables come in prime rows,
    # the dense FFN width in units of 3 x D); the dense model matches the activated count.
    d = 32
    assert abs(engram["total_params"] - moe["total_params"]) <= engram["total_params"] * 0.01
    assert abs(engram["activated_params"] - moe["activated_params"]) <= 3 * d
    assert abs(dense["activated_params"] - moe["activated_params"]) <= 3 * d
    assert engram["engram_table_params"] > 0 and moe["allocation_ratio"] == 1.0
    assert 0.6 < engram["allocation_ratio"] < 0.9
    assert results["compression_floors"]["evaluated"]["xz_9e"] > 0

    again = _run("iso_param", corpus, iso_workdir, *_micro(), jobs=2)
    assert again.count("finished earlier (skipped)") == 3, again
    assert json.loads(_read(os.path.join(iso_workdir, "results.json")))["runs"] == results["runs"]


def test_allocation_sweep_and_resume(iso_workdir, corpus, tmp_path):
    workdir = str(tmp_path)
    extra = ["--rhos=1.0,0.75", "--budgets=1", *_micro()]
    _run("allocation", corpus, workdir, *extra)
    results = _results(
        workdir, "allocation", ["b1x-rho1.00-s0", "b1x-rho0.75-s0"], ["allocation.png"]
    )
    full, mixed = results["runs"]
    assert full["total_params"] == mixed["total_params"] or (
        abs(full["total_params"] - mixed["total_params"]) <= 0.01 * full["total_params"]
    )
    assert abs(full["activated_params"] - mixed["activated_params"]) <= 3 * 32
    assert set(results["minima"]) == {"1"}
    # The same programs as the iso-parameter runs: the same losses.
    iso = json.loads(_read(os.path.join(iso_workdir, "results.json")))["runs"]
    assert mixed["final_eval_loss"] == pytest.approx(iso[2]["final_eval_loss"], rel=1e-5)

    # A run without its result is trained again from its checkpoint (here: already at the end).
    os.remove(os.path.join(workdir, "runs", "b1x-rho0.75-s0", common.RUN_RESULT_FILE))
    again = _run("allocation", corpus, workdir, *extra)
    assert "b1x-rho1.00-s0: finished earlier (skipped)" in again
    assert "b1x-rho0.75-s0: resuming" in again
    rerun = json.loads(_read(os.path.join(workdir, "results.json")))["runs"][1]
    assert rerun["final_eval_loss"] == mixed["final_eval_loss"]

    # Changed flags never mix two configs in one run directory.
    spec = common.RunSpec(
        "b1x-rho1.00-s0",
        0,
        ml_collections.ConfigDict(
            json.loads(_read(os.path.join(workdir, "runs", "b1x-rho1.00-s0", "config.json")))
        ),
    )
    spec.config.num_train_steps = STEPS + 1
    with pytest.raises(ValueError, match="trained with another config"):
        common.run_experiment(workdir, [spec], jobs=1)


def test_hyper_stability_logs_mixing_diagnostics(corpus, tmp_path):
    workdir = str(tmp_path)
    hyper = [
        "model.vocab_size=320",
        "model.num_layers=1",
        "model.num_dense_layers=1",
        "model.hidden_size=32",
        "model.mlp_hidden_size=64",
        "model.attention.num_heads=2",
        "model.attention.head_dim=16",
        "model.hc.n_streams=2",
        "batch_size=4",
        "seq_len=32",
    ]
    _run("hyper_stability", corpus, workdir, *[f"--set={h}" for h in hyper], jobs=2)
    results = _results(
        workdir,
        "hyper_stability",
        ["residual-s0", "hc-s0", "mhc-s0", "mhc_lite-s0"],
        ["hyper_stability.png"],
    )
    runs = {r["kind"]: r for r in results["runs"]}
    assert runs["residual"]["final_hc_max_composite_forward_gain"] is None
    for kind in ("hc", "mhc", "mhc_lite"):
        assert runs[kind]["final_hc_max_composite_forward_gain"] >= 1.0 - 1e-5
        assert runs[kind]["max_grad_norm"] > 0
    # Sinkhorn leaves a small column error, permutation mixtures none, HC is unconstrained.
    assert runs["mhc"]["final_hc_col_sum_err"] < 1e-3
    assert runs["mhc_lite"]["final_hc_col_sum_err"] < 1e-5
    assert runs["hc"]["final_hc_res_logit_spread"] is None
    assert runs["mhc"]["final_hc_res_logit_spread"] > 0


def test_gate_analysis(iso_workdir, corpus, tmp_path):
    workdir = str(tmp_path)
    _run("gate_analysis", corpus, workdir, "--min_count=2", *_micro())
    results = _results(
        workdir,
        "gate_analysis",
        ["engram-s0"],
        ["gate_heatmap.png", "engram_ablation_and_top_gates.png"],
    )
    run = results["runs"][0]
    analysis = run["analysis"]
    # The analysis reads exactly the tokens the final evaluation scored.
    assert analysis["engram_on_loss"] == pytest.approx(run["final_eval_loss"], rel=1e-5)
    assert analysis["analysed_tokens"] == results["eval_tokens"]
    buckets = analysis["frequency_buckets"]
    assert len(buckets) == gate_analysis.NUM_BUCKETS
    assert sum(b["tokens"] for b in buckets) == analysis["analysed_tokens"]
    assert [b["train_count_max"] for b in buckets] == sorted(
        (b["train_count_max"] for b in buckets), reverse=True
    )
    on = sum(b["loss_engram_on"] * b["tokens"] for b in buckets) / analysis["analysed_tokens"]
    assert on == pytest.approx(analysis["engram_on_loss"], rel=1e-5)
    for name in ("top_tokens", "top_bigrams", "top_trigrams"):
        assert analysis[name] and all(0 <= e["mean_gate"] <= 1 for e in analysis[name])
        assert all(e["count"] >= 2 for e in analysis[name])
    gates = [e["mean_gate"] for e in analysis["top_tokens"]]
    assert gates == sorted(gates, reverse=True)

    # Switching Engram off equals the same model without Engram layers (its other parameters).
    from engram_jax.generate import Generator
    from engram_jax.model import Transformer

    generator = Generator(os.path.join(workdir, "runs", "engram-s0"))
    with_engram = generator.config
    without = ml_collections.ConfigDict(with_engram.to_dict())
    without.model.engram.layer_ids = ()
    params = generator.variables["params"]
    rest = {
        k: {n: v for n, v in layer.items() if n != "engram"} if isinstance(layer, dict) else layer
        for k, layer in params.items()
    }
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 300, size=(2, 16)), jnp.int32)
    segments = jnp.ones_like(tokens)
    hash_ids = data_lib.compute_hash_ids(np.asarray(tokens), np.asarray(segments), generator.engram)
    extra = {k: v for k, v in generator.variables.items() if k != "params"}
    off, _ = Transformer(config_lib.validate(with_engram).model).apply(
        {**extra, "params": gate_analysis.engram_off(params)}, tokens, None, segments, hash_ids
    )
    plain, _ = Transformer(config_lib.validate(without).model).apply(
        {**extra, "params": rest}, tokens, None, segments, None
    )
    np.testing.assert_allclose(np.asarray(off), np.asarray(plain), rtol=1e-5, atol=1e-5)
    assert analysis["engram_off_loss"] != analysis["engram_on_loss"]  # the memory does matter


# ------------------------------------------------------------------------------ pure parts


def test_split_text_holds_out_the_last_fraction_of_the_characters():
    docs = ["a" * 50 + "\n" + "b" * 49, "c" * 100, "d\n" * 50]
    train, held_out = common.split_text(docs, 0.25)
    assert "".join(train) + "".join(held_out) == "".join(docs)
    assert sum(map(len, held_out)) == 74  # the cut at character 225 moves to the next line
    assert held_out[0].startswith("d") and train[-1].endswith("d\n")
    one_book = ["line\n" * 100]
    train, held_out = common.split_text(one_book, 0.05)
    assert len(held_out[0]) == 25 and train[0] + held_out[0] == one_book[0]
    with pytest.raises(ValueError, match="holdout_fraction"):
        common.split_text(["x"], 0.5)


def test_prepared_corpus_reproduces_the_split(corpus, tmp_path):
    prepared, train, held_out = common.prepare_corpus(corpus, 0.05, str(tmp_path), 320)
    # The trainer streams exactly these splits (data_path and eval_data_path).
    split = corpus_lib.Corpus(prepared.path, 0.05, prepared.eval_path)
    assert (list(split.documents("train")), list(split.documents("eval"))) == (train, held_out)
    assert prepared.eval_chars == round(0.05 * (prepared.train_chars + prepared.eval_chars)) or (
        abs(prepared.eval_chars - 0.05 * (prepared.train_chars + prepared.eval_chars)) < 80
    )
    with pytest.raises(ValueError, match="holdout_fraction"):
        common.prepare_corpus(corpus, 0.1, str(tmp_path), 320)


def test_allocation_sizing_holds_total_and_activated_fixed():
    base = iso_param.base_config()
    moe = sizing.accounting(sizing.moe_baseline(base))
    d = base.model.hidden_size
    previous_rho = 1.0
    for rho in (0.9, 0.8, 0.7, 0.6, 0.4):
        config = sizing.with_allocation(base, rho)
        acc = sizing.accounting(config)
        row_block = 2 * 2 * 4 * 8 * 20  # orders x heads x row width x a prime gap of 20 rows
        assert abs(acc.total_params - moe.total_params) <= row_block
        assert abs(acc.activated_params - moe.activated_params) <= 3 * d
        assert abs(acc.allocation_ratio - rho) < 0.5 / 14 + 1e-9  # 14 unused experts per layer
        assert acc.allocation_ratio < previous_rho
        previous_rho = acc.allocation_ratio
    dense = sizing.accounting(sizing.dense_twin(base))
    assert abs(dense.activated_params - moe.activated_params) <= 3 * d
    assert dense.total_params == dense.activated_params + dense.token_embedding_params
    with pytest.raises(ValueError, match="rho"):
        sizing.with_allocation(base, 0.0)


def test_floors_are_the_compressors_bits_per_byte():
    import bz2
    import lzma

    text = "the gate decides how much of the memory to use. " * 40
    floors = bits_per_byte(text)
    data = text.encode()
    assert floors["xz_9e"] == 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(
        data
    )
    assert floors["bzip2_9"] == 8 * len(bz2.compress(data, 9)) / len(data)
    assert floors["xz_9e"] < 8


def test_overrides_name_unknown_keys():
    config = iso_param.base_config()
    common.apply_overrides(config, ["model.hidden_size=64", "learning_rate=0.01"])
    assert config.model.hidden_size == 64 and config.learning_rate == 0.01
    with pytest.raises(config_lib.ConfigError, match="model.hiden_size"):
        common.apply_overrides(config, ["model.hiden_size=64"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        common.apply_overrides(config, ["model.hidden_size"])


def test_notebook_is_valid_and_its_code_parses():
    import ast

    import nbformat

    nb = nbformat.read(os.path.join(REPO, "colab", "experiments.ipynb"), as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            source = "\n".join(
                line
                for line in cell.source.splitlines()
                if not line.lstrip().startswith(("!", "%"))
            )
            ast.parse(source)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")
