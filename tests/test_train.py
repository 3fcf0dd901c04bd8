"""The training program end to end: exact resume after SIGKILL, one compile, eval, bad input,
and deterministic generation from the checkpoint it leaves."""

from __future__ import annotations

import dataclasses
import gc
import os
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
from engram_jax import train as train_lib
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


def _small_config(data_path: str):
    c = config_lib.base_config()
    c.num_train_steps = NUM_STEPS
    c.batch_size = 4
    c.seq_len = 32
    c.learning_rate = 3e-3
    c.warmup_steps = 2
    c.eval_every = 3
    c.eval_batches = 1
    c.checkpoint_every = 3
    c.log_every = 1
    c.data_path = data_path
    c.eval_fraction = 0.1
    m = c.model
    m.vocab_size = 320
    m.num_layers = 2
    m.hidden_size = 32
    m.mlp_hidden_size = 64
    m.num_dense_layers = 1
    m.attention.num_heads = 2
    m.attention.num_kv_heads = 1
    m.attention.head_dim = 16
    m.moe.num_experts = 4
    m.moe.top_k = 2
    m.moe.expert_hidden_size = 16
    m.engram.layer_ids = (1,)
    m.engram.heads_per_ngram = 2
    m.engram.embed_per_ngram = 16
    m.engram.table_rows_per_head = (101, 211)
    # 638 rows padded to 640, so the 8-device test can split them over fsdp x tensor = 4.
    m.engram.table_row_multiple = 4
    m.hc.kind = "mhc"
    m.hc.n_streams = 2
    return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("corpus") / "corpus.txt")
    _write_corpus(path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """One full run; other tests compare against it or read its checkpoint."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    final = train_lib.train_and_evaluate(_small_config(corpus), workdir)
    return workdir, final


def _losses(workdir: str) -> dict[int, float]:
    """Train loss per step; a resumed run's rows replace the killed run's for the same step."""
    losses = {}
    for row in metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl")):
        if "train_loss" in row:
            losses[row["step"]] = row["train_loss"]
    return losses


def _final_params(workdir: str):
    store = checkpoint_lib.CheckpointStore(os.path.join(workdir, "checkpoints"), create=False)
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


def test_resume_after_sigkill_is_exact(uninterrupted, corpus, tmp_path):
    reference_dir, _ = uninterrupted
    workdir = str(tmp_path / "killed")
    half = NUM_STEPS // 2
    # The child trains towards NUM_STEPS and SIGKILLs itself as soon as the step-`half`
    # checkpoint has committed (its directory appears under its final name).
    child = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_train import _small_config
        from engram_jax import train
        committed = os.path.join({workdir!r}, "checkpoints", "{half}")

        def kill_after_checkpoint(step, state):
            if step == {half}:
                while not os.path.isdir(committed):
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)

        train.train_and_evaluate(
            _small_config({corpus!r}), {workdir!r}, step_hook=kill_after_checkpoint
        )
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
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

    half = NUM_STEPS // 2
    child = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_train import _small_config
        from engram_jax import train
        committed = os.path.join({workdir!r}, "checkpoints", "{half}")

        def kill_after_checkpoint(step, state):
            if step == {half}:
                while not os.path.isdir(committed):
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)

        config = _small_config({corpus!r})
        config.table_placement = "host"
        train.train_and_evaluate(config, {workdir!r}, step_hook=kill_after_checkpoint)
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    train_lib.train_and_evaluate(config, workdir)
    assert _losses(workdir) == host_losses
    chex.assert_trees_all_equal(_final_params(workdir), _final_params(host_dir))

    config = _small_config(corpus)
    config.num_train_steps = NUM_STEPS + 2
    train_lib.train_and_evaluate(config, workdir)  # device placement from a host checkpoint
    assert sorted(_losses(workdir)) == list(range(1, NUM_STEPS + 3))


def test_eight_devices_match_one_device(uninterrupted, corpus, tmp_path):
    """data=2 x fsdp=2 x tensor=2 on simulated CPU devices: the tables are row-sharded over
    fsdp x tensor (vocab-parallel lookup), and the losses equal the one-device run's."""
    reference_dir, _ = uninterrupted
    workdir = str(tmp_path / "mesh")
    code = f"""
        import json, os, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import jax
        from test_train import _small_config
        from engram_jax import train

        config = _small_config({corpus!r})
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
        # Same maths, different reduction order across devices.
        assert abs(mesh_losses[step] - loss) <= 1e-4 * abs(loss), step

    # The 8-device checkpoint restores onto this one-device mesh and training continues.
    config = _small_config(corpus)
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

    # Capacity E/K, as decoding uses: the reference must not drop a token either.
    cfg = generator.model_config
    moe = dataclasses.replace(cfg.moe, capacity_factor=cfg.moe.num_experts / cfg.moe.top_k)
    model = train_lib.Transformer(dataclasses.replace(cfg, moe=moe))
    forward = jax.jit(model.apply)
    history = prompt[None, :]
    expected = []
    for _ in tokens:
        segments = np.ones_like(history)
        hash_ids = data_lib.compute_hash_ids(history, segments, generator.engram)
        logits, _ = forward(generator.variables, history, None, segments, hash_ids)
        token = int(np.argmax(np.asarray(logits)[0, -1]))
        if token == generator.spec.eos_id:
            break
        expected.append(token)
        history = np.concatenate([history, [[token]]], axis=1).astype(np.int32)
    assert tokens == expected


def test_refuses_incompatible_checkpoint_and_keeps_it(uninterrupted, corpus, tmp_path):
    workdir = str(tmp_path / "copy")
    subprocess.run(["cp", "-r", uninterrupted[0], workdir], check=True)
    config = _small_config(corpus)
    config.num_train_steps = NUM_STEPS + 3
    # Same shapes, other meaning: every table row would mean another n-gram.
    config.model.engram.hash_seed = 7
    with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="model.engram.hash_seed"):
        train_lib.train_and_evaluate(config, workdir)
    store = checkpoint_lib.CheckpointStore(os.path.join(workdir, "checkpoints"), create=False)
    assert store.latest_step() == NUM_STEPS
    store.close()


def test_corrupt_checkpoint_is_named(uninterrupted, corpus, tmp_path):
    workdir = str(tmp_path / "corrupt")
    subprocess.run(["cp", "-r", uninterrupted[0], workdir], check=True)
    state_dir = os.path.join(workdir, "checkpoints", str(NUM_STEPS), "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            if not name.startswith("_"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    config = _small_config(corpus)
    config.num_train_steps = NUM_STEPS + 3
    with pytest.raises(checkpoint_lib.CheckpointReadError, match=f"step {NUM_STEPS}"):
        train_lib.train_and_evaluate(config, workdir)
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

    with pytest.raises(ValueError, match="workdir: got 'gs://bucket/run'"):
        train_lib.train_and_evaluate(_small_config(corpus), "gs://bucket/run")

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


def test_two_processes_train_together(corpus, tmp_path):
    """A real two-process run (jax.distributed over loopback, CPU collectives through gloo): each
    process reads its own document shard, gradients are reduced across processes, only process 0
    writes metrics, and the checkpoint holds both processes' iterator states."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workdir = str(tmp_path / "two")
    child = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import jax
        process_id = int(sys.argv[1])
        jax.distributed.initialize(
            coordinator_address="localhost:{port}", num_processes=2, process_id=process_id,
            initialization_timeout=120,
        )
        from test_train import _small_config
        from engram_jax import train

        config = _small_config({corpus!r})
        config.eval_every = 0
        train.train_and_evaluate(config, {workdir!r})
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
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
    for process in children:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    rows = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    steps = [row["step"] for row in rows if "train_loss" in row]
    assert steps == list(range(1, NUM_STEPS + 1))  # one row per step: process 0 writes alone
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1
    losses = _losses(workdir)
    assert all(np.isfinite(v) for v in losses.values())
    data_items = os.listdir(os.path.join(workdir, "checkpoints", str(NUM_STEPS), "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_items)


def test_resume_with_new_data_settings_restarts_the_stream(uninterrupted, corpus, tmp_path, caplog):
    """Changing the batch size (or seed, data, process count) keeps the trained model but not the
    saved iterator position, which would mean other batches now."""
    workdir = str(tmp_path / "newdata")
    subprocess.run(["cp", "-r", uninterrupted[0], workdir], check=True)
    config = _small_config(corpus)
    config.num_train_steps = NUM_STEPS + 2
    config.batch_size = 2
    with caplog.at_level("WARNING", logger="engram_jax.train"):
        train_lib.train_and_evaluate(config, workdir)
    assert "data settings differ" in caplog.text
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, NUM_STEPS + 3))
    assert losses[NUM_STEPS + 1] < losses[1]  # resumed from the trained parameters
