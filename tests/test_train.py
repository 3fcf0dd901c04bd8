"""The training program end to end: exact resume after SIGKILL, one compile, eval, bad input,
and deterministic generation from the checkpoint it leaves."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import config as config_lib
from engram_jax import data as data_lib
from engram_jax import generate as generate_lib
from engram_jax import metrics as metrics_lib
from engram_jax import storage
from engram_jax import train as train_lib
from engram_jax.workdir_lock import WorkdirLock, WorkdirLockedError
from tests.gcs_emulator import gcs_emulator
from tests.multidevice import run_with_devices

NUM_STEPS = 6

_TEXT = (
    "the memory table maps every suffix ngram to a row and the gate decides how much of it to "
    "use while attention mixes the context of earlier tokens into the hidden state of each "
    "position so that named entities and formulaic phrases are recalled in one lookup"
)
_WORDS = _TEXT.split()


def _write_corpus(path: str) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(120):
            length = int(rng.integers(20, 60))
            # Documents are separated by two blank lines (data.split_text_documents).
            f.write(" ".join(rng.choice(_WORDS, size=length)) + "\n\n\n")


def _short_program(c, data_path: str, steps: int, every: int, warmup: int) -> None:
    """A few steps of batch 4 x 32 tokens on the test corpus, evaluating and checkpointing
    every `every` steps (so that a resume from a middle checkpoint can be checked)."""
    c.update(num_train_steps=steps, batch_size=4, seq_len=32, warmup_steps=warmup)
    c.update(eval_every=every, eval_batches=1, checkpoint_every=every, log_every=1)
    c.update(data_path=data_path, eval_fraction=0.1)
    c.model.vocab_size = 320


def _full_forward_greedy(generator, prompt, steps: int, with_hash_ids: bool) -> list[int]:
    """Up to `steps` greedy tokens after `prompt` from full forward passes of the generator's
    model, stopping at eos: the reference its cached decoding must equal. MoE capacity E/K, as
    decoding uses: the reference must not drop a token either."""
    cfg = generator.model_config
    moe = dataclasses.replace(cfg.moe, capacity_factor=cfg.moe.num_experts / cfg.moe.top_k)
    forward = jax.jit(train_lib.Transformer(dataclasses.replace(cfg, moe=moe)).apply)
    history, expected = prompt[None, :], []
    for _ in range(steps):
        args = ()
        if with_hash_ids:
            segments = np.ones_like(history)
            args = (None, segments, data_lib.compute_hash_ids(history, segments, generator.engram))
        logits, _ = forward(generator.variables, history, *args)
        token = int(np.argmax(np.asarray(logits)[0, -1]))
        if token == generator.spec.eos_id:
            break
        expected.append(token)
        history = np.concatenate([history, [[token]]], axis=1).astype(np.int32)
    return expected


def _small_config(data_path: str):
    c = config_lib.base_config()
    _short_program(c, data_path, NUM_STEPS, every=3, warmup=2)
    c.learning_rate = 3e-3
    m = c.model
    m.update(num_layers=2, hidden_size=32, mlp_hidden_size=64, num_dense_layers=1)
    m.attention.update(num_heads=2, num_kv_heads=1, head_dim=16)
    m.moe.update(num_experts=4, top_k=2, expert_hidden_size=16)
    m.engram.update(layer_ids=(1,), heads_per_ngram=2, embed_per_ngram=16)
    m.engram.table_rows_per_head = (101, 211)
    # 638 rows padded to 640, so the 8-device test can split them over fsdp x tensor = 4.
    m.engram.table_row_multiple = 4
    m.hc.update(kind="mhc", n_streams=2)
    return c


class _Lines(logging.Handler):
    """Collects the formatted messages of the package's log records."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(record.getMessage().splitlines())


@contextlib.contextmanager
def _captured_lines():
    """The package's INFO-and-above log lines while the block runs (what a run shows)."""
    package = logging.getLogger("engram_jax")
    handler, level = _Lines(), package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


# What the module's shared runs logged, by fixture name.
_RUN_LINES: dict[str, list[str]] = {}


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """One full run; other tests compare against it or read its checkpoint (its log lines are
    in `_RUN_LINES["uninterrupted"]`)."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    with _captured_lines() as lines:
        final = train_lib.train_and_evaluate(_small_config(corpus), workdir)
    _RUN_LINES["uninterrupted"] = lines
    return workdir, final


def _losses(workdir: str) -> dict[int, float]:
    """Train loss per step; a resumed run's rows replace the killed run's for the same step."""
    losses = {}
    for row in metrics_lib.read_metrics(workdir):
        if "train_loss" in row:
            losses[row["step"]] = row["train_loss"]
    return losses


def _eval_rows(workdir: str) -> dict[int, dict[str, float]]:
    """The evaluation rows of metrics.jsonl by step."""
    return {row["step"]: row for row in metrics_lib.read_metrics(workdir) if "eval_loss" in row}


def _final_params(workdir: str):
    store = checkpoint_lib.CheckpointStore(storage.join(workdir, "checkpoints"), create=False)
    restored = store.restore(items=("state", "memory"))
    store.close()
    return restored["state"]["params"], restored["memory"]["tables"]


def test_loss_falls_and_checkpoint_has_separate_memory_item(uninterrupted):
    workdir, final = uninterrupted
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    assert losses[NUM_STEPS] < losses[1]
    for key in ("eval_loss", "eval_bits_per_byte", "eval_perplexity", "mfu"):
        assert np.isfinite(final[key]), key
    # mHC diagnostics: products of row-stochastic non-negative matrices keep every row sum at 1,
    # so the composite forward gain is 1; columns are only approximately normalised.
    assert abs(final["hc_composite_forward_gain"] - 1.0) < 1e-4
    assert abs(final["hc_composite_backward_gain"] - 1.0) < 0.05
    rows = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert any("tokens_per_second" in row for row in rows)
    assert any("eval_loss" in row for row in rows)
    step_dir = os.path.join(workdir, "checkpoints", str(NUM_STEPS))
    assert {"state", "memory", "data", "meta"} <= set(os.listdir(step_dir))
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    # The memory item holds the Engram tables alone: restoring it needs no dense state.
    store = checkpoint_lib.CheckpointStore(os.path.join(workdir, "checkpoints"), create=False)
    memory = store.restore(items=("memory",))["memory"]
    store.close()
    tables = jax.tree_util.tree_leaves(memory["tables"])
    assert len(tables) == 1 and tables[0].shape == (640, 8)


def _train_until_killed(corpus: str, workdir: str, step: int, table_placement="device") -> None:
    """Runs `_small_config` in a child that trains towards NUM_STEPS and SIGKILLs itself as soon
    as the step-`step` checkpoint has committed (its directory appears under its final name)."""
    child = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_train import _small_config
        from engram_jax import train
        committed = os.path.join({workdir!r}, "checkpoints", "{step}")

        def kill_after_checkpoint(step, state):
            if step == {step}:
                while not os.path.isdir(committed):
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)

        config = _small_config({corpus!r})
        config.table_placement = {table_placement!r}
        train.train_and_evaluate(config, {workdir!r}, step_hook=kill_after_checkpoint)
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def test_resume_after_sigkill_is_exact(uninterrupted, corpus, tmp_path):
    reference_dir, _ = uninterrupted
    workdir = str(tmp_path / "killed")
    half = NUM_STEPS // 2
    _train_until_killed(corpus, workdir, half)
    store = checkpoint_lib.CheckpointStore(os.path.join(workdir, "checkpoints"), create=False)
    assert store.all_steps() == [half]
    store.close()

    train_lib.train_and_evaluate(_small_config(corpus), workdir)

    assert _losses(workdir) == _losses(reference_dir)
    resumed, reference = _final_params(workdir), _final_params(reference_dir)
    chex.assert_trees_all_equal(resumed, reference)


def test_host_tables_resume_after_sigkill_is_exact(uninterrupted, corpus, tmp_path):
    """table_placement="host": losses equal the device placement's to float tolerance, a run
    killed after its step-3 checkpoint resumes exactly, and its checkpoint then continues with
    device tables (the memory item is the same for both placements)."""
    reference_dir, _ = uninterrupted
    host_dir, workdir = str(tmp_path / "host"), str(tmp_path / "host_killed")
    config = _small_config(corpus)
    config.table_placement = "host"
    train_lib.train_and_evaluate(config, host_dir)
    host_losses = _losses(host_dir)
    for step, loss in _losses(reference_dir).items():
        assert abs(host_losses[step] - loss) <= 1e-5 * abs(loss), step
    # The mHC diagnostics run on the host tables' gathered rows too, and plot.
    host_evals, device_evals = _eval_rows(host_dir), _eval_rows(reference_dir)
    assert sorted(host_evals) == sorted(device_evals) == [3, NUM_STEPS]
    for step, row in device_evals.items():
        for key in ("hc_composite_forward_gain", "hc_row_sum_err", "eval_loss"):
            assert abs(host_evals[step][key] - row[key]) <= 1e-5 * max(abs(row[key]), 1.0), key
    assert os.path.exists(os.path.join(host_dir, "plots", "hc_amax_gain.png"))

    _train_until_killed(corpus, workdir, NUM_STEPS // 2, table_placement="host")
    train_lib.train_and_evaluate(config, workdir)
    assert _losses(workdir) == host_losses
    chex.assert_trees_all_equal(_final_params(workdir), _final_params(host_dir))

    config = _small_config(corpus)
    config.num_train_steps = NUM_STEPS + 2
    train_lib.train_and_evaluate(config, workdir)  # device placement from a host checkpoint
    assert sorted(_losses(workdir)) == list(range(1, NUM_STEPS + 3))


def _mesh_comparison_config(data_path: str):
    """`_small_config` with the Engram gate's clamp at 1e-3 instead of 1e-6, for comparing runs
    whose reductions run in another order.

    The gate is sigmoid(sign(s) sqrt(|s|)): its slope 1/(2 sqrt|s|) changes by a relative
    ds / (2|s|) when the score s moves by ds. With the default clamp one token whose score lands
    near 0 (|s| = 5e-4 in step 2's batch here) turns the float32 rounding of s into a gradient
    difference thousands of times larger (one device: params perturbed by 1e-7 relative move that
    batch's gradient by 7e-4), and Adam carries it on. 8 devices vs 1 then differed by 1.6e-5 to
    3.6e-4 relative at step 6 depending on the mesh alone, a noise floor that hid a real sharding
    bug: every row shard skipping the update of its last row gave 3.8e-5 against 3.9e-5 without
    it. With the clamp at 1e-3 the same comparisons differ by at most 1.6e-7 (2 ulps of the loss)
    and that bug by 2.2e-6.
    """
    config = _small_config(data_path)
    config.model.engram.gate_clamp = 1e-3
    return config


def test_eight_devices_match_one_device(corpus, tmp_path):
    """data=2 x fsdp=2 x tensor=2 on simulated CPU devices: the tables are row-sharded over
    fsdp x tensor (vocab-parallel lookup), and the losses equal the one-device run's."""
    reference_dir = str(tmp_path / "one_device")
    train_lib.train_and_evaluate(_mesh_comparison_config(corpus), reference_dir)
    workdir = str(tmp_path / "mesh")
    code = f"""
        import json, os, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import jax
        from test_train import _mesh_comparison_config
        from engram_jax import train

        config = _mesh_comparison_config({corpus!r})
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
        shards = {{}}

        def record(step, state):
            table = jax.tree_util.tree_leaves(state.memory)[0]
            shards["table"] = sorted({{s.data.shape for s in table.addressable_shards}})
            shards["devices"] = len(table.sharding.device_set)

        train.train_and_evaluate(config, {workdir!r}, step_hook=record)
        print(json.dumps(shards))
        """
    shards = run_with_devices(8, code)
    assert shards["devices"] == 8
    assert shards["table"] == [[160, 8]]  # 640 rows / (fsdp 2 x tensor 2)
    mesh_losses, reference = _losses(workdir), _losses(reference_dir)
    assert sorted(mesh_losses) == sorted(reference)
    for step, loss in reference.items():
        # Same maths, different reduction order across devices (and per-device row groups of the
        # sparse table update): measured at most 8.2e-8 relative (1 ulp of the loss) on this mesh
        # and 1.6e-7 on data=1 x tensor=2, sparse or dense tables, dropless or capacity MoE. A
        # shard skipping one row's update moves step 4 by 2.2e-6, so 1e-6 catches it with room
        # for another CPU's rounding.
        assert abs(mesh_losses[step] - loss) <= 1e-6 * abs(loss), step

    # The 8-device checkpoint restores onto this one-device mesh and training continues.
    config = _mesh_comparison_config(corpus)
    config.num_train_steps = NUM_STEPS + 2
    train_lib.train_and_evaluate(config, workdir)
    assert sorted(_losses(workdir)) == list(range(1, NUM_STEPS + 3))


def test_train_step_compiles_once(corpus, tmp_path):
    cfg = config_lib.validate(_small_config(corpus))
    setup = train_lib.build_data(cfg, str(tmp_path))
    mesh = train_lib.sharding.mesh_from_config(cfg.mesh)
    model = train_lib.Transformer(cfg.model)
    dense_tx, memory_tx, schedule = train_lib.make_optimizers(cfg)
    state, _ = train_lib.create_train_state(model, cfg, (dense_tx, memory_tx), mesh)
    step_fn = chex.assert_max_traces(
        train_lib.make_train_step(model, (dense_tx, memory_tx), schedule), n=1
    )
    jitted = jax.jit(step_fn, donate_argnums=0)
    batches = train_lib.make_batches(setup, cfg, train=True)
    for _ in range(3):
        state, metrics = jitted(state, train_lib.sharding.global_batch(next(batches), mesh))
    assert int(state.step) == 3
    assert np.isfinite(float(metrics["train_loss"]))


def test_greedy_generation_equals_full_forward_argmax(uninterrupted):
    """Cached decoding with incremental host hashing picks, at every step, the argmax of a full
    forward pass over the whole history with hash ids computed as in training."""
    workdir, _ = uninterrupted
    generator = generate_lib.Generator(workdir)
    sampling = generate_lib.SamplingConfig(max_tokens=8, temperature=0.0)
    prompt = np.asarray(generator.tokenizer.encode("the memory table").ids, np.int32)
    tokens = generator.generate_ids(prompt, sampling)
    assert tokens == generator.generate_ids(prompt, sampling)
    assert len(tokens) > 0

    assert tokens == _full_forward_greedy(generator, prompt, len(tokens), with_hash_ids=True)


def _snapshot(directory: str) -> dict[str, bytes]:
    """Every file below `directory` with its bytes."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


def test_refused_resume_changes_no_workdir_file(uninterrupted, corpus, tmp_path):
    workdir = str(tmp_path / "copy")
    subprocess.run(["cp", "-r", uninterrupted[0], workdir], check=True)
    before = _snapshot(workdir)
    config = _small_config(corpus)
    config.num_train_steps = NUM_STEPS + 3
    # Same shapes, other meaning: every table row would mean another n-gram.
    config.model.engram.hash_seed = 7
    with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="model.engram.hash_seed"):
        train_lib.train_and_evaluate(config, workdir)
    # Another tokenizer (its own vocabulary) is refused before it is written over the good one.
    config = _small_config(corpus)
    config.num_train_steps = NUM_STEPS + 3
    config.tokenizer_path = str(tmp_path / "other_tokenizer.json")
    _deepseek_style_tokenizer(corpus, config.tokenizer_path)
    with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="tokenizer_fingerprint"):
        train_lib.train_and_evaluate(config, workdir)
    # The tables' optimizer state has another structure under another row optimizer.
    config = _small_config(corpus)
    config.num_train_steps = NUM_STEPS + 3
    config.table_optimizer = "sgd"
    with pytest.raises(
        checkpoint_lib.CheckpointMismatchError, match="--config.table_optimizer=adam"
    ):
        train_lib.train_and_evaluate(config, workdir)
    assert _snapshot(workdir) == before
    generate_lib.Generator(workdir)  # the checkpoint and its tokenizer still load together


def _rewrite_checkpoint_metadata(workdir: str, edit) -> None:
    """Applies `edit(metadata)` to the metadata of every checkpoint step in `workdir`."""
    directory = os.path.join(workdir, "checkpoints")
    for step in os.listdir(directory):
        path = os.path.join(directory, step, "meta", "metadata")
        with open(path) as f:
            metadata = json.load(f)
        edit(metadata)
        with open(path, "w") as f:
            json.dump(metadata, f)


# Keys base_config() gained after checkpoints were first written (table_update and
# table_optimizer came together and are dropped together below).
_LATER_KEYS = (
    "data_prefetch",
    "data_workers",
    "eos_token",
    "eval_data_path",
    "profile_steps",
    "shuffle_window",
    "tokenizer_train_bytes",
)


def test_checkpoint_of_an_earlier_version_resumes_and_generates(
    uninterrupted, corpus, tmp_path, caplog
):
    """A checkpoint whose metadata predates keys (and spells the tokenizer's pad id -1) resumes
    with the tokenizer it was trained with, even where this run would train another one, and
    `generate` loads it; one that predates `table_update` (whole-table Adam) is refused by name
    instead of failing inside the restore."""

    def predate(metadata):
        for key in _LATER_KEYS:
            metadata["config"].pop(key)
        for model in (metadata["config"]["model"], metadata["model"]):
            model["pad_id"] = -1
            del model["moe"]["block_size"]

    workdir = str(tmp_path / "earlier")
    subprocess.run(["cp", "-r", uninterrupted[0], workdir], check=True)
    _rewrite_checkpoint_metadata(workdir, predate)
    sampling = generate_lib.SamplingConfig(max_tokens=4, temperature=0.0)
    assert generate_lib.Generator(workdir).generate("the memory", sampling) == (
        generate_lib.Generator(uninterrupted[0]).generate("the memory", sampling)
    )
    config = _small_config(corpus)
    config.num_train_steps = NUM_STEPS + 1
    # A BPE trained on this smaller sample would be another tokenizer.
    config.tokenizer_train_bytes = 2000
    with caplog.at_level("INFO", logger="engram_jax"):
        train_lib.train_and_evaluate(config, workdir)
    assert "resuming with the checkpoint's tokenizer" in caplog.text
    assert sorted(_losses(workdir)) == list(range(1, NUM_STEPS + 2))

    oldest = str(tmp_path / "oldest")
    subprocess.run(["cp", "-r", uninterrupted[0], oldest], check=True)
    _rewrite_checkpoint_metadata(
        oldest,
        lambda m: (predate(m), m["config"].pop("table_update"), m["config"].pop("table_optimizer")),
    )
    before = _snapshot(oldest)
    with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="--config.table_update=dense"):
        train_lib.train_and_evaluate(_small_config(corpus), oldest)
    assert _snapshot(oldest) == before


def test_corrupt_newest_checkpoint_falls_back_and_is_kept(uninterrupted, corpus, tmp_path, caplog):
    reference_dir, _ = uninterrupted
    workdir = str(tmp_path / "corrupt")
    subprocess.run(["cp", "-r", reference_dir, workdir], check=True)
    state_dir = os.path.join(workdir, "checkpoints", str(NUM_STEPS), "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            if not name.startswith("_"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    corrupt = _snapshot(os.path.join(workdir, "checkpoints", str(NUM_STEPS)))
    with caplog.at_level("WARNING", logger="engram_jax"):
        train_lib.train_and_evaluate(_small_config(corpus), workdir)
    assert f"checkpoint step {NUM_STEPS} cannot be restored" in caplog.text
    # The unreadable step is moved aside byte for byte, and training redoes it from step 3.
    aside = os.path.join(workdir, f"checkpoints.unreadable-{NUM_STEPS}")
    assert _snapshot(aside) == corrupt
    assert _losses(workdir) == _losses(reference_dir)
    chex.assert_trees_all_equal(_final_params(workdir), _final_params(reference_dir))
    # The failed read leaves orbax's sibling reads as unretrieved futures; collect them here so
    # asyncio reports them inside this test rather than after the session summary.
    gc.collect()


def test_bad_inputs_have_clear_errors(corpus, tmp_path):
    config = _small_config(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_lib.train_and_evaluate(config, str(tmp_path / "w1"))

    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        train_lib.train_and_evaluate(_small_config(str(empty)), str(tmp_path / "w2"))

    bad_tokenizer = tmp_path / "tokenizer.json"
    bad_tokenizer.write_text("{not json")
    config = _small_config(corpus)
    config.tokenizer_path = str(bad_tokenizer)
    with pytest.raises(ValueError, match="tokenizer.json"):
        train_lib.train_and_evaluate(config, str(tmp_path / "w3"))

    config = _small_config(corpus)
    config.mesh.axis_types = "explicit"
    with pytest.raises(config_lib.ConfigError, match="axis_types: got 'explicit'"):
        train_lib.train_and_evaluate(config, str(tmp_path / "w5"))

    config = _small_config(corpus)
    config.model.engram.layer_ids = (5,)
    with pytest.raises(config_lib.ConfigError, match=r"layer_ids: got \(5,\)"):
        train_lib.train_and_evaluate(config, str(tmp_path / "w4"))


def test_unknown_config_key_fails_at_parse_time(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        from engram_jax import train
        from absl import app
        train._define_flags()
        app.run(train.main)
        """
    )
    config_path = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            f"--config={config_path}",
            f"--workdir={tmp_path}",
            "--config.model.num_layerz=3",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "num_layerz" in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_resume_with_new_data_settings_restarts_the_stream(uninterrupted, corpus, tmp_path, caplog):
    """Changing the batch size (or seed, data, process count) keeps the trained model but not the
    saved iterator position, which would mean other batches now."""
    workdir = str(tmp_path / "newdata")
    subprocess.run(["cp", "-r", uninterrupted[0], workdir], check=True)
    config = _small_config(corpus)
    config.num_train_steps = NUM_STEPS + 2
    config.batch_size = 2
    with caplog.at_level("WARNING", logger="engram_jax"):
        train_lib.train_and_evaluate(config, workdir)
    assert "data settings differ" in caplog.text
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, NUM_STEPS + 3))
    assert losses[NUM_STEPS + 1] < losses[1]  # resumed from the trained parameters


def test_plots_in_the_workdir_are_valid_pngs(uninterrupted):
    import matplotlib.image

    workdir, _ = uninterrupted
    plots = os.path.join(workdir, "plots")
    names = {"loss.png", "engram_gate.png", "hc_amax_gain.png", "moe_load.png"}
    assert set(os.listdir(plots)) == names  # no leftover temporary file either
    for name in names:
        with open(os.path.join(plots, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        image = matplotlib.image.imread(os.path.join(plots, name))
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name


def _line_index(lines: list[str], prefix: str) -> int:
    """Index of the first line starting with `prefix` (fails naming it when there is none)."""
    found = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert found, f"no line starts with {prefix!r} in:\n" + "\n".join(lines)
    return found[0]


def test_a_run_says_when_it_compiles_and_closes_with_a_summary(uninterrupted):
    workdir, final = uninterrupted
    lines = _RUN_LINES["uninterrupted"]
    compiling = _line_index(lines, "compiling the training step (step 1) ...")
    compiled = _line_index(lines, "compiled the training step and ran step 1 in ")
    assert compiling < compiled < _line_index(lines, f"step 1/{NUM_STEPS} | ")
    # The first evaluation (step 3) compiles the eval step: said once, before its result.
    assert [line for line in lines if line.startswith("compiling the evaluation step")] == [
        "compiling the evaluation step (step 3) ..."
    ]
    evaluated = _line_index(lines, "compiled the evaluation step and evaluated step 3 in ")
    assert evaluated < _line_index(lines, "eval step 3 | ")
    # The ETA counts from the compiled step: none on step 1 (no rate yet), one on every later line.
    progress = [line for line in lines if re.match(rf"step \d+/{NUM_STEPS} \| ", line)]
    assert len(progress) == NUM_STEPS
    assert "ETA" not in progress[0] and all(" | ETA " in line for line in progress[1:])

    summary = _line_index(lines, f"training finished: step {NUM_STEPS} | wall time ")
    assert summary > _line_index(lines, f"step {NUM_STEPS}/{NUM_STEPS} | ")
    assert lines[summary].endswith(
        f" | train loss {final['train_loss']:.4f} | eval loss {final['eval_loss']:.4f}"
        f" | eval bits/byte {final['eval_bits_per_byte']:.4f}"
    )
    assert lines[summary + 1 : summary + 5] == [
        f"  checkpoints: {os.path.join(workdir, 'checkpoints')}",
        f"  metrics and plots: {os.path.join(workdir, 'metrics.jsonl')}, "
        f"{os.path.join(workdir, 'plots')}",
        f"  TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}",
        f'  generate: python -m engram_jax.generate --workdir={workdir} --prompt="..." '
        "--max_tokens=40",
    ]
    # A plain run warns of nothing.
    assert not [line for line in lines if "disabled" in line or "replacing" in line], lines
    assert not [line for line in lines if "fewer than vocab_size" in line], lines


def test_rerun_of_a_finished_run_says_so_and_names_what_it_replaces(
    uninterrupted, corpus, tmp_path
):
    """Nothing to do (and nothing compiled) when the checkpoint is at num_train_steps; a
    tokenizer.json that is not the checkpoint's is replaced by name; eval_batches=0 is named."""
    workdir = str(tmp_path / "finished")
    subprocess.run(["cp", "-r", uninterrupted[0], workdir], check=True)
    tokenizer_json = os.path.join(workdir, "tokenizer.json")
    with open(tokenizer_json) as f:
        trained = f.read()
    _deepseek_style_tokenizer(corpus, tokenizer_json)
    config = _small_config(corpus)
    config.eval_batches = 0
    with _captured_lines() as lines:
        assert train_lib.train_and_evaluate(config, workdir) == {}
    assert (
        f"nothing to do: already at step {NUM_STEPS} (num_train_steps={NUM_STEPS}) in {workdir}; "
        "raise num_train_steps to train further"
    ) in lines
    replaced = lines[_line_index(lines, f"replacing {tokenizer_json} (tokenizer ")]
    assert "by the tokenizer this run uses" in replaced
    with open(tokenizer_json) as f:
        assert f.read() == trained  # the checkpoint's tokenizer is back
    _line_index(lines, "evaluation is disabled (eval_batches=0): no eval loss")
    assert not [line for line in lines if "compiling" in line or "training finished" in line]


def test_a_bpe_smaller_than_vocab_size_is_named(corpus, tmp_path):
    config = _small_config(corpus)
    config.model.vocab_size = 4096  # this corpus holds a few dozen words
    cfg = config_lib.validate(config)
    with _captured_lines() as lines:
        setup = train_lib.build_data(cfg, str(tmp_path))
    size = setup.tokenizer.get_vocab_size()
    assert size < 4096
    line = lines[_line_index(lines, f"the trained BPE has {size} tokens, fewer than vocab_size")]
    assert f"ids {size}..4095 are never used" in line


def _run_until_signal(corpus: str, workdir: str, signum: int, at_step: int, tmp_path):
    """Runs the command-line trainer (`train.main` under absl) on `_small_config`, sending
    `signum` to itself from the step hook after step `at_step`."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    config_file = tmp_path / f"config_{signum}.py"
    config_file.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {tests_dir!r})
            from test_train import _small_config

            def get_config():
                return _small_config({corpus!r})
            """
        )
    )
    child = textwrap.dedent(
        f"""
        import functools, os, sys
        sys.path.insert(0, {tests_dir!r})
        from absl import app
        from engram_jax import train

        def send_signal(step, state):
            if step == {at_step}:
                os.kill(os.getpid(), {int(signum)})

        # The real entry point; only the fault injection is added.
        train.train_and_evaluate = functools.partial(
            train.train_and_evaluate, step_hook=send_signal
        )
        train._define_flags()
        app.run(train.main)
        """
    )
    return subprocess.run(
        [sys.executable, "-c", child, f"--config={config_file}", f"--workdir={workdir}"],
        capture_output=True,
        text=True,
    )


def test_sigterm_and_sigint_save_the_current_step_and_resume_exactly(
    uninterrupted, corpus, tmp_path
):
    """A preemption (SIGTERM) after step 2 and a Ctrl-C (SIGINT) after step 4, while the step-3
    checkpoint may still be writing: each run saves the step it stopped at, flushes its metrics
    and exits with 128 + the signal number and one line; the resumed run matches an
    uninterrupted one exactly."""
    reference_dir, _ = uninterrupted
    workdir = str(tmp_path / "signals")
    checkpoints = os.path.join(workdir, "checkpoints")

    result = _run_until_signal(corpus, workdir, signal.SIGTERM, 2, tmp_path)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "stopped by SIGTERM at step 2: checkpoint saved" in result.stderr
    store = checkpoint_lib.CheckpointStore(checkpoints, create=False)
    assert store.all_steps() == [2]
    store.close()
    assert max(_losses(workdir)) == 2

    result = _run_until_signal(corpus, workdir, signal.SIGINT, 4, tmp_path)
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-3000:]
    assert "stopped by SIGINT at step 4: checkpoint saved" in result.stderr
    store = checkpoint_lib.CheckpointStore(checkpoints, create=False)
    assert store.all_steps() == [2, 3, 4]
    store.close()
    assert max(_losses(workdir)) == 4

    train_lib.train_and_evaluate(_small_config(corpus), workdir)
    assert _losses(workdir) == _losses(reference_dir)
    chex.assert_trees_all_equal(_final_params(workdir), _final_params(reference_dir))


def test_workdir_that_is_a_file_or_read_only_is_named(corpus, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(NotADirectoryError, match=f"workdir: '{a_file}' is a file"):
        train_lib.train_and_evaluate(_small_config(corpus), str(a_file))
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits, not the immutable attribute
        subprocess.run(["chattr", "+i", str(read_only)], check=True)
    try:
        with pytest.raises(PermissionError, match=f"workdir: cannot write to '{read_only}'"):
            train_lib.train_and_evaluate(_small_config(corpus), str(read_only))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(read_only)], check=True)
        read_only.chmod(0o755)
    assert os.listdir(read_only) == []


def _deepseek_style_tokenizer(corpus: str, path: str) -> int:
    """A byte-level BPE with DeepSeek-V3's specials (bos 0, eos 1, pad 2), shorter than the
    model's vocabulary; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(data_lib.load_documents(corpus), trainer=trainer)
    tokenizer.save(path)
    return tokenizer.get_vocab_size()


def test_generation_with_a_short_deepseek_tokenizer(corpus, tmp_path, caplog):
    """A model whose vocabulary (384) is larger than its tokenizer (300, DeepSeek specials) never
    samples an id the tokenizer lacks, stops on DeepSeek's eos, and refuses bad arguments."""
    workdir = str(tmp_path / "short")
    config = _small_config(corpus)
    config.tokenizer_path = str(tmp_path / "tokenizer.json")
    num_tokens = _deepseek_style_tokenizer(corpus, config.tokenizer_path)
    config.num_train_steps = 2
    config.eval_every = config.eval_batches = config.checkpoint_every = 0
    config.model.vocab_size = 384
    config.model.moe.num_experts = 0
    train_lib.train_and_evaluate(config, workdir)

    generator = generate_lib.Generator(workdir)
    assert generator.num_tokens == num_tokens < 384
    assert (generator.spec.eos_id, generator.spec.pad_id, generator.spec.bos_id) == (1, 2, 0)
    prompt = generator._encode("the memory table")
    # Near-uniform sampling: without the mask about a fifth of the draws fall past the tokenizer.
    hot = generate_lib.SamplingConfig(max_tokens=40, temperature=50.0, seed=3)
    tokens = generator.generate_ids(prompt, hot)
    assert tokens and max(tokens) < num_tokens and 1 not in tokens
    generator.tokenizer.decode(tokens)

    # A prompt longer than the trained context keeps its last seq_len tokens.
    long_prompt = np.tile(prompt, 20)[:45]
    # 32 + 11 = 3 + 40 cache positions: the decode steps compiled above are reused.
    greedy = generate_lib.SamplingConfig(max_tokens=11, temperature=0.0)
    with caplog.at_level("WARNING", logger="engram_jax.generate"):
        kept = generator.generate_ids(long_prompt, greedy)
    assert "prompt: 45 tokens, longer than the trained context seq_len=32" in caplog.text
    assert kept == generator.generate_ids(long_prompt[-32:], greedy)

    with pytest.raises(ValueError, match=f"top_k: got {num_tokens + 1}; expected at most"):
        generator.generate_ids(prompt, generate_lib.SamplingConfig(top_k=num_tokens + 1))
    with pytest.raises(ValueError, match="max_tokens: got -1; expected an integer >= 0"):
        generate_lib.SamplingConfig(max_tokens=-1)


def test_resume_drops_metric_rows_past_the_checkpoint_and_prunes_leftovers(
    uninterrupted, corpus, tmp_path, caplog
):
    """A run killed after step 6's metrics but before its checkpoint: the resumed run writes
    steps 4-6 once (not twice), with the uninterrupted run's losses. Then a run with a smaller
    max_to_keep deletes the checkpoints beyond it, taking over a lock left by a dead process."""
    reference_dir, _ = uninterrupted
    workdir = str(tmp_path / "leftover")
    subprocess.run(["cp", "-r", reference_dir, workdir], check=True)
    subprocess.run(["rm", "-r", os.path.join(workdir, "checkpoints", str(NUM_STEPS))], check=True)

    train_lib.train_and_evaluate(_small_config(corpus), workdir)
    rows = metrics_lib.read_metrics(workdir)
    train_steps = [row["step"] for row in rows if "train_loss" in row]
    eval_steps = [row["step"] for row in rows if "eval_loss" in row]
    assert train_steps == list(range(1, NUM_STEPS + 1))
    assert eval_steps == [3, NUM_STEPS]
    assert _losses(workdir) == _losses(reference_dir)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {"host": socket.gethostname(), "pid": dead.pid, "run_id": "x", "heartbeat": 0.0}
    with open(os.path.join(workdir, "run.lock"), "w") as f:
        json.dump(lock, f)
    config = _small_config(corpus)
    config.max_to_keep = 1
    with caplog.at_level("WARNING", logger="engram_jax.workdir_lock"):
        train_lib.train_and_evaluate(config, workdir)  # nothing left to train
    assert f"pid {dead.pid} is not running" in caplog.text
    assert not os.path.exists(os.path.join(workdir, "run.lock"))
    store = checkpoint_lib.CheckpointStore(os.path.join(workdir, "checkpoints"), create=False)
    assert store.all_steps() == [NUM_STEPS]
    store.close()


def test_second_run_on_a_locked_workdir_names_the_holder(uninterrupted, corpus, tmp_path):
    workdir = str(tmp_path / "locked")
    subprocess.run(["cp", "-r", uninterrupted[0], workdir], check=True)
    before = _snapshot(workdir)
    with WorkdirLock(workdir):
        holder = f"host {socket.gethostname()!r} pid {os.getpid()}"
        with pytest.raises(WorkdirLockedError, match=re.escape(holder)):
            train_lib.train_and_evaluate(_small_config(corpus), workdir)
    assert _snapshot(workdir) == before


def test_gs_workdir_end_to_end(uninterrupted, corpus):
    """Checkpoints (with the memory item), metrics, TensorBoard events and the tokenizer in a
    bucket of a local GCS emulator: a crash after step 4, a resume that continues exactly, metrics
    read back once per step, and generation from the bucket."""
    reference_dir, _ = uninterrupted
    with gcs_emulator() as bucket:
        workdir = f"{bucket}/run"

        def crash(step, state):
            if step == 4:
                raise KeyboardInterrupt("simulated crash")

        with pytest.raises(KeyboardInterrupt):
            train_lib.train_and_evaluate(_small_config(corpus), workdir, step_hook=crash)
        assert storage.listdir(f"{workdir}/checkpoints") == ["3"]
        # The resumed run reads its tokenizer from the bucket too.
        storage.copy_file(os.path.join(reference_dir, "tokenizer.json"), f"{bucket}/tok.json")
        config = _small_config(corpus)
        config.tokenizer_path = f"{bucket}/tok.json"
        train_lib.train_and_evaluate(config, workdir)

        assert {"state", "memory", "data", "meta"} <= set(
            storage.listdir(f"{workdir}/checkpoints/{NUM_STEPS}")
        )
        assert _losses(workdir) == _losses(reference_dir)
        rows = metrics_lib.read_metrics(workdir)
        assert [row["step"] for row in rows if "train_loss" in row] == list(range(1, NUM_STEPS + 1))
        assert any(n.startswith("events.out") for n in storage.listdir(f"{workdir}/tensorboard"))
        assert not storage.exists(f"{workdir}/run.lock")
        sampling = generate_lib.SamplingConfig(max_tokens=6, temperature=0.0)
        prompt = "the memory table"
        assert generate_lib.Generator(workdir).generate(prompt, sampling) == (
            generate_lib.Generator(reference_dir).generate(prompt, sampling)
        )
        chex.assert_trees_all_equal(_final_params(workdir), _final_params(reference_dir))


def test_gs_data_path_trains(corpus, tmp_path):
    """`data_path` a directory in a bucket of the local GCS emulator: the tokenizer is trained on
    a sample read from the bucket, training and evaluation stream their documents from it, and
    the run equals one on a local copy of the same files."""
    config = _small_config(corpus)
    config.num_train_steps = 2
    config.eval_every = 0
    config.checkpoint_every = 0
    with open(corpus, encoding="utf-8") as f:
        text = f.read()
    local = tmp_path / "local"
    local.mkdir()
    # Two files (by-file shards); the second in a sub-folder: the listing recurses.
    cut = text.index("\n\n\n", len(text) // 2) + 3
    (local / "sub").mkdir()
    (local / "a.txt").write_text(text[:cut], encoding="utf-8")
    (local / "sub" / "b.txt").write_text(text[cut:], encoding="utf-8")
    config.data_path = str(local)
    reference = train_lib.train_and_evaluate(config, str(tmp_path / "local_run"))
    with gcs_emulator() as bucket:
        for name in ("a.txt", "sub/b.txt"):
            storage.copy_file(str(local / name), f"{bucket}/data/{name}")
        config.data_path = f"{bucket}/data"
        final = train_lib.train_and_evaluate(config, str(tmp_path / "gs_run"))
    assert _losses(str(tmp_path / "gs_run")) == _losses(str(tmp_path / "local_run"))
    assert final["eval_loss"] == reference["eval_loss"]


@pytest.fixture(scope="module")
def two_process_job(corpus, tmp_path_factory):
    """One real job of 2 processes x 2 devices (jax.distributed over loopback, CPU collectives
    through gloo), shared by the tests below: each child checks that a process whose fingerprints
    differ is named, trains (tracing steps 2-4), then dumps the documents of one epoch of its
    training stream. Returns (workdir, [(stdout, stderr) per process])."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    job = str(tmp_path_factory.mktemp("two_process") / "job")
    child = textwrap.dedent(
        f"""
        import json, logging, os, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import jax
        process_id = int(sys.argv[1])
        jax.distributed.initialize(
            coordinator_address="localhost:{port}", num_processes=2, process_id=process_id,
            initialization_timeout=120,
        )
        logging.basicConfig(level=logging.INFO)
        from test_train import _small_config
        from engram_jax import train

        try:
            train.check_processes_agree({{"hasher": "h", "tokenizer": "ab"[process_id]}})
        except train.ProcessMismatchError as e:
            print("MISMATCH", e, flush=True)
        config = _small_config({corpus!r})
        config.eval_every = 0
        config.profile_steps = (2, 4)
        train.train_and_evaluate(config, {job!r})
        # The documents of one epoch of this process's training stream, as the trainer reads it.
        cfg = train.config_lib.validate(config)
        setup = train.build_data(cfg, {job!r})
        seen = list(train.document_stream(setup, cfg, train=True, num_epochs=1))
        with open(os.path.join({job!r}, f"seen_{{process_id}}.json"), "w") as f:
            json.dump(seen, f)
        """
    )
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        # With several devices per process, one process loading from the persistent compilation
        # cache while the other compiles made gloo time out setting up the step's collectives.
        JAX_ENABLE_COMPILATION_CACHE="false",
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", child, str(process_id)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for process_id in (0, 1)
    ]
    outputs = [process.communicate(timeout=600) for process in children]
    for process, (_, stderr) in zip(children, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    return job, outputs


def test_two_processes_train_together(two_process_job, corpus):
    """Each process reads its own document shard, gradients are reduced across processes, only
    process 0 writes metrics, the checkpoint holds both processes' iterator states, and each
    process writes its profiler trace."""
    workdir, _ = two_process_job
    rows = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    steps = [row["step"] for row in rows if "train_loss" in row]
    assert steps == list(range(1, NUM_STEPS + 1))  # one row per step: process 0 writes alone
    events = [f for f in os.listdir(os.path.join(workdir, "tensorboard")) if "tfevents" in f]
    assert len(events) == 1
    losses = _losses(workdir)
    assert all(np.isfinite(v) for v in losses.values())
    data_items = os.listdir(os.path.join(workdir, "checkpoints", str(NUM_STEPS), "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_items)
    # Each process read its own documents: disjoint shards that together are the training split.
    seen = []
    for process_id in (0, 1):
        with open(os.path.join(workdir, f"seen_{process_id}.json")) as f:
            seen.append(json.load(f))
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    corpus_docs = data_lib.load_documents(corpus)
    train_docs = data_lib.corpus_lib.Corpus(corpus, 0.1).documents("train")
    assert sorted(seen[0] + seen[1]) == sorted(train_docs)
    assert len(seen[0]) + len(seen[1]) < len(corpus_docs)  # the held-out documents are not seen
    # profile_steps: each process wrote a jax.profiler trace where TensorBoard looks for it.
    for log_dir in ("tensorboard", os.path.join("tensorboard", "process_1")):
        profile_dir = os.path.join(workdir, log_dir, "plugins", "profile")
        traces = [f for _, _, files in os.walk(profile_dir) for f in files]
        assert any(f.endswith(".xplane.pb") for f in traces), (log_dir, traces)


def test_two_process_job_shares_one_tokenizer_and_resumes_on_one_process(
    two_process_job, corpus, tmp_path, caplog
):
    """Process 0 alone trains the BPE and the other loads it, a process whose fingerprints differ
    is named, and the job's step-3 checkpoint resumes on 1 process x 1 device (with remat
    switched on, a compute-only change) and on 1 process x 4 devices, continuing the same data
    stream with the losses the 2-process job reached (relative tolerance 1e-4: the reductions
    run in another order)."""
    job, outputs = two_process_job
    for stdout, _ in outputs:
        assert "MISMATCH" in stdout and "process 1: tokenizer" in stdout
        assert "process 1: hasher" not in stdout
    assert "training a byte-level BPE" in outputs[0][1]
    assert "training a byte-level BPE" not in outputs[1][1]
    reference = _losses(job)
    assert sorted(reference) == list(range(1, NUM_STEPS + 1))

    def resumable_copy(name: str) -> str:
        workdir = str(tmp_path / name)
        subprocess.run(["cp", "-r", job, workdir], check=True)
        subprocess.run(["rm", "-r", os.path.join(workdir, "checkpoints", str(NUM_STEPS))])
        return workdir

    def assert_continues(workdir: str) -> None:
        losses = _losses(workdir)
        assert sorted(losses) == list(range(1, NUM_STEPS + 1))
        for step in range(NUM_STEPS // 2 + 1, NUM_STEPS + 1):
            assert abs(losses[step] - reference[step]) <= 1e-4 * abs(reference[step]), (
                step,
                losses,
                reference,
            )

    one = resumable_copy("one_device")
    config = _small_config(corpus)
    config.eval_every = 0
    config.model.remat = True
    with caplog.at_level("INFO", logger="engram_jax"):
        train_lib.train_and_evaluate(config, one)
    assert "model.remat: checkpoint False, config True" in caplog.text
    assert "resuming a data stream of 2 shards on 1 processes" in caplog.text
    # The stream continues from the saved position (a restart would repeat the first batches).
    assert "data settings differ" not in caplog.text
    assert "checkpoint step 3: data stream position restored (shards 0, 1)" in caplog.text
    assert_continues(one)

    four = resumable_copy("four_devices")
    run_with_devices(
        4,
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_train import _small_config
        from engram_jax import train
        config = _small_config({corpus!r})
        config.eval_every = 0
        train.train_and_evaluate(config, {four!r})
        print("{{}}")
        """,
    )
    assert_continues(four)
