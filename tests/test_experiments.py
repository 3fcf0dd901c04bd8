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
from engram_jax.experiments import budget, gate_analysis, heldout, iso_param, runner, sizing
from engram_jax.experiments import options as options_lib
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
    "pair",
    "total_params",
    "activated_params",
    "final_eval_loss",
    "eval_bits_per_byte",
    "tokens_seen",
    "table_rows",
    "table_param_share",
    "updates_per_row_mean",
    "lookups_per_row_mean",
    "rows_updated_100_share",
}
T_975_ONE_DEGREE = 12.706204736174705  # Student t quantile 0.975 with 1 degree of freedom


def _micro_overrides(num_layers: int) -> list[str]:
    """`--set` values of a micro dense model with two streams, for the sweeps' end-to-end runs."""
    return [
        "model.vocab_size=320",
        f"model.num_layers={num_layers}",
        f"model.num_dense_layers={num_layers}",
        "model.hidden_size=32",
        "model.mlp_hidden_size=64",
        "model.attention.num_heads=2",
        "model.attention.head_dim=16",
        "model.hc.n_streams=2",
        "batch_size=4",
        "seq_len=32",
    ]


def _write_corpus(path: str) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(100):
            picks = rng.choice(len(_PHRASES), size=int(rng.integers(3, 7)))
            # Documents are separated by two blank lines.
            f.write(". ".join(_PHRASES[i] for i in picks) + ".\n\n\n")


def _run(name: str, corpus: str, workdir: str, *extra: str, jobs: int = 1, seeds: int = 1) -> str:
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
        f"--seeds={seeds}",
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
        assert run["pair"] == f"s{run['seed']}" or run["pair"].endswith(f"-s{run['seed']}")
        assert run["total_params"] >= run["activated_params"] > 0
        # Packed rows: every position but the last document's tail of a row holds a token.
        assert 0.5 * run["tokens"] < run["tokens_seen"] <= run["tokens"]
        assert run["table_param_share"] == run["engram_table_params"] / run["total_params"]
        if run["engram_table_params"]:
            # An update is once per step, a lookup once per token and head.
            assert 0 < run["updates_per_row_mean"] <= run["steps"]
            assert run["updates_per_row_mean"] < run["lookups_per_row_mean"]
            assert run["rows_updated_100_share"] == 0.0  # 3 steps: no row reaches 100
        else:
            assert run["updates_per_row_mean"] is None and run["table_rows"] == 0
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
    _run("iso_param", corpus, workdir, *_micro(), jobs=2, seeds=2)
    return workdir


# ------------------------------------------------------------------------ experiments end to end


def test_iso_param_matches_parameters_and_skips_finished_runs(iso_workdir, corpus):
    results = _results(
        iso_workdir,
        "iso_param",
        ["dense-s0", "moe-s0", "engram-s0", "dense-s1", "moe-s1", "engram-s1"],
        ["validation_curves.png", "final_bits_per_byte.png"],
    )
    dense, moe, engram = results["runs"][:3]
    # Equal total and activated parameters for MoE and Engram + MoE (tables come in prime rows,
    # the dense FFN width in units of 3 x D); the dense model matches the activated count.
    d = 32
    assert abs(engram["total_params"] - moe["total_params"]) <= engram["total_params"] * 0.01
    assert abs(engram["activated_params"] - moe["activated_params"]) <= 3 * d
    assert abs(dense["activated_params"] - moe["activated_params"]) <= 3 * d
    assert engram["engram_table_params"] > 0 and moe["allocation_ratio"] == 1.0
    assert 0.6 < engram["allocation_ratio"] < 0.9
    assert results["compression_floors"]["evaluated"]["xz_9e"] > 0

    again = _run("iso_param", corpus, iso_workdir, *_micro(), jobs=2, seeds=2)
    assert again.count("finished earlier (skipped)") == 6, again
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
    os.remove(os.path.join(workdir, "runs", "b1x-rho0.75-s0", runner.RUN_RESULT_FILE))
    again = _run("allocation", corpus, workdir, *extra)
    assert "b1x-rho1.00-s0: finished earlier (skipped)" in again
    assert "b1x-rho0.75-s0: resuming" in again
    rerun = json.loads(_read(os.path.join(workdir, "results.json")))["runs"][1]
    assert rerun["final_eval_loss"] == mixed["final_eval_loss"]

    # Changed flags never mix two configs in one run directory.
    spec = runner.RunSpec(
        "b1x-rho1.00-s0",
        0,
        ml_collections.ConfigDict(
            json.loads(_read(os.path.join(workdir, "runs", "b1x-rho1.00-s0", "config.json")))
        ),
    )
    spec.config.num_train_steps = STEPS + 1
    with pytest.raises(ValueError, match="trained with another config"):
        runner.run_experiment(workdir, [spec], jobs=1)


def test_hyper_stability_logs_mixing_diagnostics(corpus, tmp_path):
    workdir = str(tmp_path)
    hyper = _micro_overrides(num_layers=1)
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


def _run_config(workdir: str, name: str) -> ml_collections.ConfigDict:
    from engram_jax.experiments import json_config

    return json_config.get_config(os.path.join(workdir, "runs", name, runner.RUN_CONFIG_FILE))


def _initial_values(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Every leaf of the trainer's freshly initialised state (parameters, tables, router
    biases), by path."""
    import jax

    from engram_jax import sharding
    from engram_jax import train as train_lib
    from engram_jax.model import Transformer

    cfg = config_lib.validate(config)
    mesh = sharding.mesh_from_config(cfg.mesh)
    txs = train_lib.make_optimizers(cfg)[:2]
    state, _ = train_lib.create_train_state(Transformer(cfg.model), cfg, txs, mesh)
    leaves = {}
    for tree in ("params", "memory", "moe_bias"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(state, tree)):
            leaves[tree + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return leaves


def _first_batches(config: ml_collections.ConfigDict, count: int = 3) -> list[dict]:
    _, batches = budget.training_batches(config_lib.validate(config))
    keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    return [{k: batch[k] for k in keys} for batch in (next(batches) for _ in range(count))]


def test_runs_paired_by_seed_start_alike_and_read_the_same_batches(iso_workdir):
    names = ("dense-s0", "moe-s0", "engram-s0", "engram-s1")
    configs = {name: _run_config(iso_workdir, name) for name in names}
    init = {name: _initial_values(config) for name, config in configs.items()}
    for a, b in (("dense-s0", "moe-s0"), ("moe-s0", "engram-s0"), ("dense-s0", "engram-s0")):
        shared = [k for k in init[a] if k in init[b] and init[a][k].shape == init[b][k].shape]
        assert len(shared) >= 10, (a, b, shared)
        for key in shared:
            np.testing.assert_array_equal(init[a][key], init[b][key], err_msg=f"{a} {b} {key}")
    # Another seed draws every random leaf anew (constant inits such as norm scales stay).
    random_leaves = [k for k, v in init["engram-s0"].items() if np.ptp(v) > 0]
    assert len(random_leaves) >= 10
    for key in random_leaves:
        assert not np.array_equal(init["engram-s0"][key], init["engram-s1"][key]), key

    batches = {name: _first_batches(config) for name, config in configs.items()}
    for name in ("moe-s0", "engram-s0"):
        for mine, theirs in zip(batches[name], batches["dense-s0"], strict=True):
            for key, value in mine.items():
                np.testing.assert_array_equal(value, theirs[key], err_msg=f"{name} {key}")
    assert not np.array_equal(batches["engram-s1"][0]["inputs"], batches["engram-s0"][0]["inputs"])


def test_table_usage_counts_updates_once_per_step_and_lookups_per_read(iso_workdir):
    config = _run_config(iso_workdir, "engram-s0")
    results = json.loads(_read(os.path.join(iso_workdir, "results.json")))
    record = next(r for r in results["runs"] if r["name"] == "engram-s0")
    cfg = config_lib.validate(config)
    setup, batches = budget.training_batches(cfg)
    # Straightforward reference: each layer's flat table holds its heads' rows one after the
    # other; a row is updated in a step when any position of the batch reads it.
    sizes = [setup.engram.hasher.head_vocab_sizes(layer) for layer in cfg.model.engram.layer_ids]
    offsets = [np.concatenate([[0], np.cumsum(s)[:-1]]) for s in sizes]
    updates = [np.zeros(sum(s), np.int64) for s in sizes]
    lookups = [np.zeros(sum(s), np.int64) for s in sizes]
    tokens = 0
    for _ in range(STEPS):
        batch = next(batches)
        tokens += int((batch["segment_ids"] > 0).sum())
        for layer in range(len(sizes)):
            flat = (batch["hash_ids"][:, layer] + offsets[layer]).reshape(-1)  # [B * T * M]
            lookups[layer] += np.bincount(flat, minlength=updates[layer].size)
            updates[layer] += np.bincount(flat, minlength=updates[layer].size) > 0
    per_row = np.concatenate(updates)
    assert record["tokens_seen"] == tokens
    assert record["table_rows"] == per_row.size
    assert record["updates_per_row_mean"] == pytest.approx(per_row.mean(), rel=1e-12)
    assert record["lookups_per_row_mean"] == pytest.approx(
        np.concatenate(lookups).mean(), rel=1e-12
    )
    assert record["rows_updated_100_share"] == float((per_row >= 100).mean())


def test_summary_reports_paired_differences_with_t_intervals(iso_workdir):
    runs = json.loads(_read(os.path.join(iso_workdir, "results.json")))["runs"]
    summary = _read(os.path.join(iso_workdir, "summary.md"))
    loss = {(r["variant"], r["pair"]): r["final_eval_loss"] for r in runs}
    for treatment, reference in iso_param.COMPARISONS:
        diffs = [loss[(treatment, p)] - loss[(reference, p)] for p in ("s0", "s1")]
        mean = sum(diffs) / 2
        # Two pairs: sample sd |d0 - d1| / sqrt(2), standard error sd / sqrt(2).
        half = T_975_ONE_DEGREE * abs(diffs[0] - diffs[1]) / 2
        row = f"| {treatment} - {reference} | s0: {diffs[0]:+.4f}, s1: {diffs[1]:+.4f} | "
        assert row in summary, summary
        line = next(
            x for x in summary.splitlines() if x.startswith(f"- {treatment} - {reference}:")
        )
        assert f"{mean:+.4f} nats/token over 2 paired seed(s)" in line, line
        assert f"[{mean - half:+.4f}, {mean + half:+.4f}]" in line, line
        assert ("contains zero" in line) == (mean - half <= 0 <= mean + half), line


def test_updates_per_row_target_sizes_tables_at_equal_parameters(corpus, tmp_path):
    prepared, _, _ = heldout.prepare_corpus(corpus, 0.05, str(tmp_path), 320)
    base = iso_param.base_config()
    options_lib.apply_overrides(base, MICRO)
    options = options_lib.Options(
        data_path=corpus,
        workdir=str(tmp_path),
        steps=40,
        seeds=1,
        jobs=1,
        holdout_fraction=0.05,
        eval_tokens=128,
        evals=2,
        overrides=(),
        updates_per_row=6.0,
    )
    probe = runner.training_config(sizing.with_allocation(base, 0.75), options, prepared)
    distinct = budget.distinct_ngrams_per_step(probe)
    planned = budget.planned_rows(probe, options.updates_per_row)
    assert planned == budget.rows_for_updates(distinct, 40, 6.0)
    assert budget.expected_updates_per_row(distinct, planned, 40) == pytest.approx(6.0, rel=0.02)
    config = runner.training_config(sizing.with_allocation(base, 0.75, planned), options, prepared)
    acc = sizing.accounting(config)
    moe = sizing.accounting(sizing.moe_baseline(base))
    assert abs(acc.total_params - moe.total_params) <= 0.01 * moe.total_params
    assert abs(acc.activated_params - moe.activated_params) <= 3 * 32
    rows = tuple(config.model.engram.table_rows_per_head)
    assert rows[1] / rows[0] == pytest.approx(planned[1] / planned[0], rel=0.05)
    # The replayed stream's updates agree with the model the rows were solved from.
    usage = budget.table_usage(config)
    expected = budget.expected_updates_per_row(distinct, rows, 40)
    assert usage.updates_per_row_mean == pytest.approx(expected, rel=0.2)


# ------------------------------------------------------------------------------ pure parts


def test_split_text_holds_out_the_last_fraction_of_the_characters():
    docs = ["a" * 50 + "\n" + "b" * 49, "c" * 100, "d\n" * 50]
    train, held_out = heldout.split_text(docs, 0.25)
    assert "".join(train) + "".join(held_out) == "".join(docs)
    assert sum(map(len, held_out)) == 74  # the cut at character 225 moves to the next line
    assert held_out[0].startswith("d") and train[-1].endswith("d\n")
    one_book = ["line\n" * 100]
    train, held_out = heldout.split_text(one_book, 0.05)
    assert len(held_out[0]) == 25 and train[0] + held_out[0] == one_book[0]
    with pytest.raises(ValueError, match="holdout_fraction"):
        heldout.split_text(["x"], 0.5)


def test_prepared_corpus_reproduces_the_split(corpus, tmp_path):
    prepared, train, held_out = heldout.prepare_corpus(corpus, 0.05, str(tmp_path), 320)
    # The trainer streams exactly these splits (data_path and eval_data_path).
    split = corpus_lib.Corpus(prepared.path, 0.05, prepared.eval_path)
    assert (list(split.documents("train")), list(split.documents("eval"))) == (train, held_out)
    assert prepared.eval_chars == round(0.05 * (prepared.train_chars + prepared.eval_chars)) or (
        abs(prepared.eval_chars - 0.05 * (prepared.train_chars + prepared.eval_chars)) < 80
    )
    with pytest.raises(ValueError, match="holdout_fraction"):
        heldout.prepare_corpus(corpus, 0.1, str(tmp_path), 320)


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
    options_lib.apply_overrides(config, ["model.hidden_size=64", "learning_rate=0.01"])
    assert config.model.hidden_size == 64 and config.learning_rate == 0.01
    with pytest.raises(config_lib.ConfigError, match="model.hiden_size"):
        options_lib.apply_overrides(config, ["model.hiden_size=64"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        options_lib.apply_overrides(config, ["model.hidden_size"])


def test_iso_param_variants_flag_keeps_variant_order_and_refuses_bad_lists():
    assert iso_param.parse_variants("engram,moe") == ("moe", "engram")
    assert iso_param.parse_variants(",".join(iso_param.VARIANTS)) == iso_param.VARIANTS
    for bad in ("moe", "moe,moe", "moe,engrm", ""):
        with pytest.raises(ValueError, match="--variants"):
            iso_param.parse_variants(bad)


def test_time_to_floor_finds_the_first_evaluation_below_the_floor():
    from engram_jax.experiments.time_to_floor import first_below

    log = [
        "I1231 23:59:50.000000 1 train.py:1] starting\n",
        "I1231 23:59:59.500000 1 metrics.py:1] eval step 100 | loss 6.1 | bits/byte 2.4\n",
        "not a log line | bits/byte 0.1\n",
        "I0101 00:00:20.000000 1 metrics.py:1] eval step 200 | loss 5.2 | bits/byte 2.05\n",
        "I0101 00:01:00.000000 1 metrics.py:1] eval step 300 | loss 5.0 | bits/byte 1.9\n",
    ]
    crossed = first_below(log, 2.1, "r")
    assert (crossed.step, crossed.bits_per_byte, crossed.final_bits_per_byte) == (200, 2.05, 1.9)
    assert crossed.seconds == pytest.approx(30.0)  # across the new year's night
    never = first_below(log, 1.5, "r")
    assert never.step is None and never.seconds is None and never.final_bits_per_byte == 1.9


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


def test_paired_difference_and_interval_against_a_direct_computation():
    from engram_jax.experiments import stats

    losses = {"s0": (3.10, 3.20), "s1": (3.00, 3.12), "s2": (3.30, 3.38), "s3": (None, 3.0)}
    runs = [
        {"variant": v, "pair": p, "final_eval_loss": pair[i]}
        for p, pair in losses.items()
        for i, v in enumerate(("engram", "moe"))
    ]
    d = stats.paired_difference(runs, "variant", "engram", "moe")
    diffs = np.array([-0.10, -0.12, -0.08])  # s3 diverged: left out
    assert d.pairs == ("s0", "s1", "s2")
    np.testing.assert_allclose(d.differences, diffs, rtol=1e-12)
    half = 4.302652729911275 * diffs.std(ddof=1) / np.sqrt(3)  # t quantile 0.975, 2 dof
    assert (d.low, d.high) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert d.decided and "excludes zero" in d.verdict()
    single = stats.paired_difference(runs[:2], "variant", "engram", "moe")
    assert not single.decided and "no interval" in single.verdict()
    wide = stats.paired_difference(
        runs[:4]
        + [{"variant": "engram", "pair": "s9", "final_eval_loss": 9.0}]
        + [{"variant": "moe", "pair": "s9", "final_eval_loss": 1.0}],
        "variant",
        "engram",
        "moe",
    )
    assert wide.low < 0 < wide.high and "contains zero" in wide.verdict()


def test_rows_for_updates_inverts_the_hashing_model_and_matches_a_simulation():
    distinct, steps, target = [300.0, 450.0], 200, 50.0
    rows = budget.rows_for_updates(distinct, steps, target)
    assert budget.expected_updates_per_row(distinct, rows, steps) == pytest.approx(target, rel=1e-2)
    # Monte Carlo of the model: each step hashes D distinct n-grams to uniform random rows.
    rng = np.random.default_rng(0)
    updates = [np.zeros(r, np.int64) for r in rows]
    for _ in range(steps):
        for counts, d in zip(updates, distinct, strict=True):
            counts[np.unique(rng.integers(0, counts.size, size=int(d)))] += 1
    assert np.concatenate(updates).mean() == pytest.approx(target, rel=0.03)
    with pytest.raises(ValueError, match="updates_per_row"):
        budget.rows_for_updates(distinct, steps, steps)
