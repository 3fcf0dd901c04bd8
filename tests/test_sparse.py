"""Sparse table training: SGD equals dense SGD exactly, row-wise Adagrad and lazy Adam equal a
numpy reference over several steps with repeated and colliding rows, host dedup is complete."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from engram_jax import config as config_lib
from engram_jax import data as data_lib
from engram_jax import train as train_lib
from engram_jax.model import Transformer, engram_table_sizes
from engram_jax.tables import device_step
from engram_jax.tables.row_optim import RowOptimizer
from engram_jax.tables.unique_rows import sum_rows, unique_rows


def _tiny_model_config():
    c = config_lib.base_config()
    c.update(batch_size=4, seq_len=8)
    m = c.model
    m.update(vocab_size=64, num_layers=2, hidden_size=16, mlp_hidden_size=32, num_dense_layers=2)
    m.attention.update(num_heads=2, num_kv_heads=1, head_dim=8)
    m.engram.update(layer_ids=(0, 1), heads_per_ngram=2, embed_per_ngram=8)
    # Tiny tables: many ids of one batch collide on the same rows.
    m.engram.table_rows_per_head = (5, 7)
    m.hc.update(kind="residual", n_streams=1)
    return c


def _batch(cfg, rng, shards=1):
    b, t = cfg.train.batch_size, cfg.train.seq_len
    sizes = engram_table_sizes(cfg.model)
    per_layer = [sizes[layer] for layer in cfg.model.engram.layer_ids]
    hash_ids = np.stack(
        [rng.integers(0, np.asarray(p)[None, None, :], size=(b, t, len(p))) for p in per_layer],
        axis=1,
    ).astype(np.int32)  # [B, L, T, M]
    ids, inverse = data_lib.unique_table_rows(hash_ids, per_layer, shards)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(b, t)).astype(np.int32)
    return {
        "inputs": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": np.ones((b, t), np.float32),
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "hash_ids": hash_ids,
        "memory_ids": ids,
        "memory_inverse": inverse,
    }


def test_unique_table_rows_is_an_exact_dedup():
    rng = np.random.default_rng(0)
    sizes = [[3, 5], [7, 2]]
    hash_ids = np.stack(
        [rng.integers(0, np.asarray(p), size=(4, 6, 2)) for p in sizes], axis=1
    )  # [B=4, L=2, T=6, M=2]
    ids, inverse = data_lib.unique_table_rows(hash_ids, sizes, shards=2)
    assert ids.shape == (2, 2, 2 * 6 * 2) and inverse.shape == hash_ids.shape
    for layer, p in enumerate(sizes):
        offsets = np.array([0, p[0]])
        for b in range(4):
            group = ids[b // 2, layer]
            flat = hash_ids[b, layer] + offsets  # [T, M]
            np.testing.assert_array_equal(group[inverse[b, layer]], flat)
        for g in range(2):
            real = ids[g, layer][ids[g, layer] >= 0]
            assert len(set(real.tolist())) == real.size  # distinct
            assert (ids[g, layer][real.size :] == -1).all()  # padding at the end
    with pytest.raises(ValueError, match="memory_shards: got 3"):
        data_lib.unique_table_rows(hash_ids, sizes, shards=3)


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax.numpy"])
def test_unique_rows_and_sum_rows_follow_one_contract(xp):
    """numpy (host: pipeline, host tables) and jax.numpy (device update, under jit) give the same
    sorted distinct ids padded with the fill value, an exact inverse and per-id sums, against a
    plain-Python reference."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 9, size=(3, 5)).astype(np.int32)
    ids[0, 0] = 12  # the fill value of the device update: an ordinary id here
    values = rng.standard_normal((ids.size, 4)).astype(np.float32)
    distinct = sorted(set(ids.reshape(-1).tolist()))
    size = ids.size
    unique, inverse = unique_rows(xp.asarray(ids), size=size, fill_value=12, xp=xp)
    unique, inverse = np.asarray(unique), np.asarray(inverse)
    assert unique.tolist() == distinct + [12] * (size - len(distinct))
    assert inverse.shape == ids.shape
    np.testing.assert_array_equal(unique[inverse], ids)
    ids_N = ids.reshape(-1)
    summed_ids, summed = sum_rows(xp.asarray(ids_N), xp.asarray(values), size=size, xp=xp)
    reference = {i: values[ids_N == i].astype(np.float64).sum(0) for i in distinct}
    summed_ids, summed = np.asarray(summed_ids), np.asarray(summed)
    for slot, i in enumerate(distinct):
        assert summed_ids[slot] == i
        np.testing.assert_allclose(summed[slot], reference[i], rtol=1e-6, atol=1e-6)
    assert not summed[len(distinct) :].any()  # padding slots sum nothing
    if xp is np:
        exact, _ = unique_rows(ids)  # no size: exactly the distinct ids
        assert exact.tolist() == distinct
        with pytest.raises(ValueError, match="exceed size=2"):
            unique_rows(ids, size=2)


def test_sparse_sgd_equals_dense_sgd_exactly():
    """Whole train step, f32: dense SGD on the table gradient vs sparse SGD on unique rows."""
    cfg = config_lib.validate(_tiny_model_config())
    model = Transformer(cfg.model)
    lr = 0.5
    dense_tx = optax.sgd(0.1)
    schedule = optax.constant_schedule(0.1)
    batch = _batch(cfg, np.random.default_rng(1))
    mesh = train_lib.sharding.mesh_from_config(cfg.mesh)
    state, _ = train_lib.create_train_state(model, cfg, (dense_tx, optax.sgd(lr)), mesh)
    dense_step = jax.jit(train_lib.make_train_step(model, (dense_tx, optax.sgd(lr)), schedule))
    dense_state, dense_metrics = dense_step(state, batch)

    sparse_opt = RowOptimizer(kind="sgd", learning_rate=lr)
    sparse_state = state.replace(memory_opt_state=sparse_opt.init(state.memory))
    sparse_step = jax.jit(device_step.make_sparse_train_step(model, dense_tx, sparse_opt, schedule))
    sparse_state, sparse_metrics = sparse_step(sparse_state, batch)
    chex.assert_trees_all_equal(sparse_state.memory, dense_state.memory)
    chex.assert_trees_all_equal(sparse_state.params, dense_state.params)
    assert float(sparse_metrics["train_loss"]) == float(dense_metrics["train_loss"])
    np.testing.assert_allclose(
        sparse_metrics["memory_grad_norm"], dense_metrics["memory_grad_norm"], rtol=1e-6
    )
    # Rows no id touched are unchanged.
    table0 = jax.tree_util.tree_leaves(state.memory)[0]
    table1 = jax.tree_util.tree_leaves(sparse_state.memory)[0]
    touched = np.unique(batch["memory_ids"][:, 0])
    untouched = np.setdiff1d(np.arange(table0.shape[0]), touched)
    np.testing.assert_array_equal(np.asarray(table1)[untouched], np.asarray(table0)[untouched])


def _reference_step(kind, table, state, ids, grads, lr, step, b1=0.9, b2=0.95, eps=1e-8):
    """Straightforward numpy reference: sum each row's gradients over the whole step, then the
    row rule, row by row (float64 accumulation, compared with a tolerance)."""
    summed = {}
    for i, g in zip(ids.reshape(-1), grads.reshape(-1, grads.shape[-1]), strict=True):
        if i >= 0:
            summed[int(i)] = summed.get(int(i), 0.0) + g.astype(np.float64)
    for r, g in summed.items():
        if kind == "adagrad":
            state["accumulator"][r] += np.mean(g * g)
            table[r] -= lr * g / (np.sqrt(state["accumulator"][r]) + eps)
        else:
            state["count"][r] += 1
            c = state["count"][r]
            state["mu"][r] = b1 * state["mu"][r] + (1 - b1) * g
            state["nu"][r] = b2 * state["nu"][r] + (1 - b2) * g * g
            m_hat = state["mu"][r] / (1 - b1**c)
            v_hat = state["nu"][r] / (1 - b2**c)
            table[r] -= lr * m_hat / (np.sqrt(v_hat) + eps)


@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_row_optimizers_match_numpy_reference(kind):
    rows, width, groups, per_group, steps = 12, 3, 2, 5, 4
    rng = np.random.default_rng(2)
    opt = RowOptimizer(kind=kind, learning_rate=lambda s: 0.1 / (1.0 + s))
    table = rng.normal(size=(rows, width)).astype(np.float32)
    state = opt.init_numpy(rows, width)
    ref_table = table.astype(np.float64)
    ref_state = {k: v.astype(np.float64 if k != "count" else v.dtype) for k, v in state.items()}
    update = jax.jit(device_step.update_table, static_argnums=0)
    dev_table, dev_state = jnp.asarray(table), jax.tree.map(jnp.asarray, state)
    for step in range(steps):
        # Each group's ids are distinct (host dedup) but groups collide with each other; rows
        # 0 and 1 appear every step, padding (-1) sits at the end.
        ids = np.full((groups, per_group), -1, np.int32)
        for g in range(groups):
            picked = np.concatenate([[0, 1], rng.choice(np.arange(2, rows), 2, replace=False)])
            ids[g, :4] = np.sort(picked)
        grads = rng.normal(size=(groups, per_group, width)).astype(np.float32)
        grads[ids < 0] = 0.0
        lr = opt.lr(step)
        dev_table, dev_state, _ = update(opt, dev_table, dev_state, ids, grads, lr)
        _reference_step(kind, ref_table, ref_state, ids, grads, lr, step)
    np.testing.assert_allclose(np.asarray(dev_table), ref_table, rtol=1e-5, atol=1e-6)
    for key, value in ref_state.items():
        np.testing.assert_allclose(np.asarray(dev_state[key]), value, rtol=1e-5, atol=1e-7)
    # The numpy (host) path applies the same rule: one row update compared directly.
    rows_np, state_np = opt.update_rows(
        table[:2], np.ones((2, width), np.float32), {k: v[:2] for k, v in state.items()}, 0.1, np
    )
    rows_jx, state_jx = opt.update_rows(
        jnp.asarray(table[:2]),
        jnp.ones((2, width)),
        {k: jnp.asarray(v[:2]) for k, v in state.items()},
        0.1,
    )
    np.testing.assert_allclose(rows_np, np.asarray(rows_jx), rtol=1e-6)


def test_host_placement_matches_device_placement_over_ten_steps():
    """Same batches, same lazy Adam: tables on the device vs in host RAM with prefetch, each
    initialised where it lives (same values). The tiny tables make consecutive steps share most
    rows, so the patch of prefetched rows is exercised (a stale read would change the losses)."""
    from engram_jax.tables import host_tables

    cfg = config_lib.validate(_tiny_model_config())
    model = Transformer(cfg.model)
    dense_tx = optax.adamw(1e-2)
    schedule = optax.constant_schedule(1e-2)
    opt = RowOptimizer(kind="adam", learning_rate=lambda s: 0.05 * (s + 1) / 10)
    mesh = train_lib.sharding.mesh_from_config(cfg.mesh)
    state, _ = train_lib.create_train_state(model, cfg, (dense_tx, opt), mesh)
    rng = np.random.default_rng(3)
    batches = [_batch(cfg, rng) for _ in range(10)]

    on_device_step = jax.jit(device_step.make_sparse_train_step(model, dense_tx, opt, schedule))
    device_state, device_losses = state, []
    for batch in batches:
        device_state, metrics = on_device_step(device_state, batch)
        device_losses.append(float(metrics["train_loss"]))

    paths = device_step.table_paths(cfg.model)
    # The trainer's host start: numpy tables with the device values, built without the device.
    host_start, _ = train_lib.create_train_state(
        model, cfg, (dense_tx, opt), mesh, table_placement="host"
    )
    assert host_start.memory_opt_state == {}
    with pytest.raises(ValueError, match="table_placement='disk'"):
        train_lib.create_train_state(model, cfg, (dense_tx, opt), mesh, table_placement="disk")
    for p in paths:
        host_table = device_step.get_path(host_start.memory, p)
        assert isinstance(host_table, np.ndarray)
        np.testing.assert_array_equal(host_table, np.asarray(device_step.get_path(state.memory, p)))
    tables = host_tables.HostTables.from_memory(
        host_start.memory, host_start.memory_opt_state, paths, opt
    )
    trainer = host_tables.HostTableTrainer(
        tables, jax.jit(device_step.make_row_grad_step(model, dense_tx, schedule))
    )
    host_state, host_losses = host_tables.state_without_tables(host_start), []
    for i, batch in enumerate(batches):
        next_batch = batches[i + 1] if i + 1 < len(batches) else None
        host_state, metrics = trainer(host_state, batch, next_batch)
        host_losses.append(float(metrics["train_loss"]))
    trainer.close()
    np.testing.assert_allclose(host_losses, device_losses, rtol=1e-5)
    for p in paths:
        # Adam divides by sqrt(nu): rows with near-zero gradients amplify float noise; a stale
        # read would be off by a whole step (lr ~ 5e-3 .. 5e-2).
        np.testing.assert_allclose(
            tables.tables[p], np.asarray(device_step.get_path(device_state.memory, p)), atol=2e-4
        )
        device_count = device_step.get_path(device_state.memory_opt_state, p)["count"]
        np.testing.assert_array_equal(tables.state[p]["count"], np.asarray(device_count))
    # The checkpoint item has the device placement's layout (a checkpoint moves between them).
    item = tables.memory_item()
    chex.assert_trees_all_equal_structs(
        jax.tree.map(np.asarray, item),
        jax.tree.map(
            np.asarray, {"tables": device_state.memory, "opt_state": device_state.memory_opt_state}
        ),
    )


def test_table_config_errors_name_the_field():
    c = _tiny_model_config()
    c.table_placement = "host"
    c.table_update = "dense"
    with pytest.raises(config_lib.ConfigError, match="config.table_update: got 'dense'"):
        config_lib.validate(c)
    c = _tiny_model_config()
    c.table_optimizer = "lamb"
    with pytest.raises(config_lib.ConfigError, match="config.table_optimizer: got 'lamb'"):
        config_lib.validate(c)
    with pytest.raises(ValueError, match="kind='lamb'"):
        RowOptimizer(kind="lamb")
