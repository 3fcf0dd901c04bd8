"""Host-placed OverEncoding and per-layer-embedding tables (`table_placement="host"`): a few steps
of the host trainer (prefetch, patch of stale rows, updates on the host) give the device sparse
step's losses, tables and optimizer state, for the shipped tiny_overencoding and tiny_ple configs
(shrunk in size); their checkpoint item has the device layout; UltraMem is refused with its
reason. test_host_memory_tables_train.py trains Engram with both token tables end to end."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from engram_jax import config as config_lib
from engram_jax import train as train_lib
from engram_jax.configs import config_path
from engram_jax.model import Transformer
from engram_jax.overencoding_ids import OverEncodingIds
from engram_jax.tables import device_step, host_tables

NUM_STEPS = 6
# Host and device sum a row's gradients in different orders (numpy vs a device sort): the
# losses agree to float32 rounding carried through a few Adam steps.
LOSS_RTOL = 1e-5
# Lazy Adam divides by sqrt(nu): a row whose gradient is near float noise amplifies the rounding
# (as in test_sparse; seen up to 3.4e-4 on a PLE row, 2% of one step); a stale row would be off by
# a whole step (table lr 1.5e-2), 20x this tolerance.
TABLE_ATOL = 7.5e-4


def _shrunk(name: str, engram: bool = False):
    """The shipped config `name` with every size shrunk for a test (settings untouched); with
    `engram`, tiny.py's Engram (small tables) and the other token table too."""
    c = config_lib.load_config_file(config_path(name))
    c.update(batch_size=2, seq_len=16, num_train_steps=NUM_STEPS, warmup_steps=1)
    m = c.model
    m.update(vocab_size=48, num_layers=2, hidden_size=16, mlp_hidden_size=32, num_dense_layers=1)
    m.attention.update(num_heads=2, num_kv_heads=1, head_dim=8)
    m.moe.update(num_experts=4, top_k=2, expert_hidden_size=16)
    # Few rows: consecutive batches share rows (the prefetched rows get patched) and a batch
    # reads some rows twice (summed once).
    m.overencoding.base_rows = 29
    m.ple.width = 8
    if engram:
        m.overencoding.enabled = m.ple.enabled = True
        m.engram.update(layer_ids=(1,), heads_per_ngram=2, embed_per_ngram=8)
        m.engram.table_rows_per_head = (5, 7)
    return config_lib.validate(c)


# Engram with both token tables trains end to end in test_host_memory_tables_train.py.
MODELS = {
    "tiny_overencoding": lambda: _shrunk("tiny_overencoding"),
    "tiny_ple": lambda: _shrunk("tiny_ple"),
}


def _batches(cfg, count: int) -> list[dict[str, np.ndarray]]:
    """Batches as the input pipeline makes them (`overencoding_ids` computed on the host)."""
    rng = np.random.default_rng(0)
    b, t, m = cfg.train.batch_size, cfg.train.seq_len, cfg.model
    out = []
    for _ in range(count):
        tokens = rng.integers(0, m.vocab_size, size=(b, t)).astype(np.int32)
        segments = np.ones((b, t), np.int32)
        segments[0, t // 2 :] = 2  # a document starts mid-row
        batch = {
            "inputs": tokens,
            "targets": np.roll(tokens, -1, axis=1),
            "loss_mask": np.ones((b, t), np.float32),
            "segment_ids": segments,
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        }
        oe_ids = OverEncodingIds.from_model_config(m)
        if oe_ids is not None:
            batch["overencoding_ids"] = oe_ids(tokens, segments)
        out.append(batch)
    return out


@pytest.fixture(scope="module", params=sorted(MODELS))
def both_placements(request):
    """NUM_STEPS steps on the same batches with the tables on the device (the sparse device step)
    and in host RAM (`HostTableTrainer` with prefetch), each initialised where it lives."""
    cfg = MODELS[request.param]()
    model = Transformer(cfg.model)
    dense_tx, table_opt, schedule = train_lib.make_optimizers(cfg)
    txs = (dense_tx, table_opt)
    mesh = train_lib.sharding.mesh_from_config(cfg.mesh)
    batches = _batches(cfg, NUM_STEPS)

    start, _ = train_lib.create_train_state(model, cfg, txs, mesh)
    step = jax.jit(device_step.make_sparse_train_step(model, dense_tx, table_opt, schedule))
    device_state, device_losses = start, []
    for batch in batches:
        device_state, metrics = step(device_state, batch)
        device_losses.append(float(metrics["train_loss"]))

    # The host start: numpy copies of the device tables, fresh optimizer state (the host tables
    # `create_train_state(..., table_placement="host")` builds are tested equal in test_sparse).
    sets = host_tables.row_sets(cfg.model)
    tables = host_tables.HostTables.from_memory(start.memory, {}, sets, table_opt)
    trainer = host_tables.HostTableTrainer(
        tables,
        jax.jit(device_step.make_row_grad_step(model, dense_tx, schedule)),
        batch_ids=lambda batch: host_tables.row_ids(cfg.model, batch),
    )
    host_state, host_losses = host_tables.state_without_tables(start), []
    for i, batch in enumerate(batches):
        host_state, metrics = trainer(
            host_state, batch, batches[i + 1] if i + 1 < NUM_STEPS else None
        )
        host_losses.append(float(metrics["train_loss"]))
    trainer.close()
    return {
        "name": request.param,
        "cfg": cfg,
        "start": start,
        "device": (device_state, device_losses),
        "host": (host_state, host_losses, tables),
    }


def test_row_sets_are_the_configs_host_tables(both_placements):
    expected = {
        "tiny_overencoding": {"overencoding": [("overencoding", "table")]},
        "tiny_ple": {"ple": [("ple", "table")]},
    }[both_placements["name"]]
    assert host_tables.row_sets(both_placements["cfg"].model) == expected
    combined = _shrunk("tiny_ple", engram=True).model
    assert list(host_tables.row_sets(combined)) == ["engram", "overencoding", "ple"]


def test_host_losses_equal_device_losses(both_placements):
    _, device_losses = both_placements["device"]
    _, host_losses, _ = both_placements["host"]
    assert all(np.isfinite(device_losses))
    np.testing.assert_allclose(host_losses, device_losses, rtol=LOSS_RTOL)


def test_host_tables_and_state_equal_device_tables(both_placements):
    device_state, _ = both_placements["device"]
    _, _, tables = both_placements["host"]
    start = both_placements["start"]
    for p in tables.paths:
        device_table = np.asarray(device_step.get_path(device_state.memory, p))
        initial = np.asarray(device_step.get_path(start.memory, p))
        # The steps moved the table well beyond the tolerance (the comparison can fail).
        assert np.max(np.abs(device_table - initial)) > 10 * TABLE_ATOL, p
        np.testing.assert_allclose(tables.tables[p], device_table, rtol=1e-5, atol=TABLE_ATOL)
        device_opt = device_step.get_path(device_state.memory_opt_state, p)
        # Lazy Adam's per-row step count: the same rows were updated on the same steps.
        np.testing.assert_array_equal(tables.state[p]["count"], np.asarray(device_opt["count"]))
        assert np.any(tables.state[p]["count"] == NUM_STEPS), p  # rows read by every step


def test_host_checkpoint_item_has_the_device_layout(both_placements):
    device_state, _ = both_placements["device"]
    _, _, tables = both_placements["host"]
    device_item = {"tables": device_state.memory, "opt_state": device_state.memory_opt_state}
    chex.assert_trees_all_equal_structs(
        jax.tree.map(np.asarray, tables.memory_item()), jax.tree.map(np.asarray, device_item)
    )
    # The device placement's item loads into host tables (a device checkpoint on the host).
    sets = host_tables.row_sets(both_placements["cfg"].model)
    loaded = host_tables.HostTables.from_memory(
        both_placements["start"].memory, {}, sets, tables.opt
    )
    loaded.load_memory_item(jax.device_get(device_item))
    for p in tables.paths:
        np.testing.assert_array_equal(
            loaded.tables[p], np.asarray(device_step.get_path(device_state.memory, p))
        )
        for key, value in device_step.get_path(device_state.memory_opt_state, p).items():
            np.testing.assert_array_equal(loaded.state[p][key], np.asarray(value))


def test_token_rows_read_twice_in_one_sequence_are_summed():
    """A token table's ids repeat within a group (unlike Engram's, deduplicated per group by the
    pipeline): with one sequence too, a row read twice gets its gradients summed once."""
    ids_SU = np.array([[3, 5, 3, -1, 3]])
    grads_SUW = np.arange(10, dtype=np.float32).reshape(1, 5, 2)
    ids_N, grads_NW = host_tables.HostTables.summed_grads(ids_SU, grads_SUW, unique_groups=False)
    order = np.argsort(ids_N)
    np.testing.assert_array_equal(ids_N[order], [3, 5])
    expected = [grads_SUW[0, [0, 2, 4]].sum(0), grads_SUW[0, 1]]
    np.testing.assert_array_equal(grads_NW[order], expected)


def test_host_placement_refuses_ultramem_with_its_reason():
    c = config_lib.load_config_file(config_path("tiny_ultramem"))
    c.table_placement = "host"
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(c)
    message = str(error.value)
    assert "config.table_placement: got 'host'" in message
    assert "top-k over the hidden state inside the forward pass" in message
    for name in ("tiny_overencoding", "tiny_ple"):
        c = config_lib.load_config_file(config_path(name))
        c.table_placement = "host"
        assert config_lib.validate(c).train.table_placement == "host"
