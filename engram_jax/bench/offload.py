"""Engram tables at scale: sparse vs dense table updates, device vs host-RAM tables.

python -m engram_jax.bench.offload                     # ~1.07B-parameter table on the host
python -m engram_jax.bench.offload --offload_rows_base=1000000   # quick look (~128M params)

One small Transformer (one Engram layer, W = 32, M = 4 heads, batch 8 x 128 tokens), three parts,
side by side in one process:

1. Table scaling. Step time with the table at `--scale_rows_base` and 10x that many rows, same model
   otherwise, with sparse lazy Adam (`table_update="sparse"`) and with whole-table optax Adam
   (`"dense"`). The ratio large/small is what the sparse path removes: the dense step reads and
   writes every row, its moments and a table-sized gradient.
2. Training offload. Steps/s with the ~1B-parameter table on the device vs in host RAM
   (`host_tables.HostTableTrainer`: rows of step t+1 gathered while step t runs, overlapped host
   updates), both with `--offload_optimizer` (SGD: no table-sized optimizer state, so the run fits a
   24 GiB machine). "wait" is the share of the host run spent waiting for rows before a step could
   be dispatched (the blocking share the offload demos report).
3. Decode offload. Greedy batch-1 decoding of `--decode_tokens` tokens with the trained table on
   the device vs in host RAM, through `engram_jax.generate.DecodeStep`, the step `generate` runs:
   one jitted step with the lookup inside for device tables; for host tables the token's rows are
   submitted to a `RowGatherer` first, the layers below the Engram layer (layer 0 here) are
   dispatched, the rows are gathered (numpy, on the decoding thread) while they run, and the
   layers from the Engram layer on are dispatched with them. "decode wait" is the share of
   decoding spent in that gather. The host table is a view of the device-trained table's buffer
   (CPU backend; a device-to-host copy on an accelerator), so the two placements' generations
   alternate after one warm-up generation each, and the medians compare like with like.

   Why not the whole `generate.Generator`: it loads a checkpoint, so the ~1B-parameter table would
   first be written as one (with its optimizer state at initialisation: several times the 4.3 GB
   table in RAM and on disk) and read back per placement, which a shared 24 GiB machine does not
   afford within a bench run. What `Generator` adds around `DecodeStep` (tokenizer, n-gram hashing
   of the history, sampling) is the same for every placement; `engram_jax.bench.offload_decode`
   times the whole `Generator` per placement on smaller tables (`measure_decode`).

The device and host tables of part 2 never coexist (one is freed before the other is built), and
the device table is drawn block by block, so peak RSS is about one table plus the dense model
(5.7 GB measured at 1.07B parameters). Batches are random token and hash ids (the row
access pattern of hashed n-grams is close to uniform). The last two lines are the summary.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from engram_jax import config as config_lib
from engram_jax import data as data_lib
from engram_jax import host_tables, optim, sparse_tables, table_store
from engram_jax import train as train_lib
from engram_jax.bench._timing import machine_description, print_table
from engram_jax.engram import head_offsets
from engram_jax.generate import DecodeStep
from engram_jax.model import Transformer, engram_table_sizes
from engram_jax.sparse_optim import RowOptimizer


def _config(rows_base: int, batch: int, seq: int) -> config_lib.Config:
    c = config_lib.base_config()
    c.batch_size, c.seq_len = batch, seq
    m = c.model
    m.vocab_size = 1024
    m.num_layers = 2
    m.hidden_size = 64
    m.mlp_hidden_size = 128
    m.num_dense_layers = 2
    m.attention.num_heads = 2
    m.attention.num_kv_heads = 1
    m.attention.head_dim = 32
    m.engram.layer_ids = (1,)
    m.engram.max_ngram = 3
    m.engram.heads_per_ngram = 2
    m.engram.embed_per_ngram = 64  # W = 32
    m.engram.table_rows_per_head = (rows_base, rows_base)
    m.hc.kind = "residual"
    m.hc.n_streams = 1
    return config_lib.validate(c)


def _batches(cfg: config_lib.Config, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    b, t = cfg.train.batch_size, cfg.train.seq_len
    sizes = engram_table_sizes(cfg.model)
    per_layer = [sizes[layer] for layer in cfg.model.engram.layer_ids]
    out = []
    for _ in range(count):
        hash_ids = np.stack(
            [rng.integers(0, np.asarray(p), size=(b, t, len(p))) for p in per_layer], axis=1
        ).astype(np.int32)  # [B, L, T, M]
        ids, inverse = data_lib.unique_table_rows(hash_ids, per_layer, 1)
        tokens = rng.integers(0, cfg.model.vocab_size, size=(b, t)).astype(np.int32)
        out.append(
            {
                "inputs": tokens,
                "targets": np.roll(tokens, -1, axis=1),
                "loss_mask": np.ones((b, t), np.float32),
                "segment_ids": np.ones((b, t), np.int32),
                "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                "hash_ids": hash_ids,
                "memory_ids": ids,
                "memory_inverse": inverse,
            }
        )
    return out


def _dense_state(cfg: config_lib.Config, dense_tx: optax.GradientTransformation) -> Any:
    """TrainState without tables: the model initialised on pre-gathered rows creates none."""
    e = cfg.model.engram
    model = Transformer(cfg.model)
    rows = jnp.zeros((1, len(e.layer_ids), 1, e.num_heads, e.row_width))
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32), engram_rows=rows)
    params = variables["params"]
    return train_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        memory={},
        opt_state=dense_tx.init(params),
        memory_opt_state={},
        moe_bias={},
    )


def _table_shape(cfg: config_lib.Config) -> tuple[int, int]:
    sizes = engram_table_sizes(cfg.model)[cfg.model.engram.layer_ids[0]]
    return int(sum(sizes)), cfg.model.engram.row_width


def _device_table(shape: tuple[int, int], block_rows: int = 1 << 20) -> jax.Array:
    """N(0, 1) rows drawn block by block into one donated buffer: peak is the table plus a block
    (one `jax.random.normal` of the whole table held its random bits and temporaries too, ~4x the
    table at 1B parameters, which a shared 24 GiB machine cannot spare)."""
    rows, width = shape
    block_rows = min(block_rows, rows)

    @functools.partial(jax.jit, donate_argnums=0)
    def fill(table_RW, key, start):
        block_BW = jax.random.normal(key, (block_rows, width), jnp.float32)
        # The last block is clamped to end at the table's end (it overlaps the one before).
        return jax.lax.dynamic_update_slice(table_RW, block_BW, (start, 0))

    table_RW = jnp.zeros(shape, jnp.float32)
    key = jax.random.PRNGKey(1)
    for start in range(0, rows, block_rows):
        table_RW = fill(table_RW, jax.random.fold_in(key, start), jnp.int32(start))
    return table_RW


def _host_table(shape: tuple[int, int], block_rows: int = 1 << 20) -> np.ndarray:
    """N(0, 1) rows filled block by block (no table-sized temporaries)."""
    table = np.empty(shape, np.float32)
    rng = np.random.default_rng(1)
    for start in range(0, shape[0], block_rows):
        rng.standard_normal(out=table[start : start + block_rows], dtype=np.float32)
    return table


def _time_device_steps(step: Callable, state: Any, batches: list, warmup: int) -> tuple[float, Any]:
    """Median seconds per step over the timed batches (each step waited for: the median resists
    load spikes of a shared machine), and the last state (the step donates its input)."""
    for batch in batches[:warmup]:
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    samples = []
    for batch in batches[warmup:]:
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), state


def table_scaling(rows_base: int, steps: int, warmup: int) -> list[dict[str, Any]]:
    """Part 1: sparse lazy Adam vs dense optax Adam at 1x and 10x the rows.

    The four variants are built (and warmed up) first. Then the two sizes of one update kind are
    stepped alternately, one timed step each per round, so a load change on a shared machine hits
    both sizes alike; medians per variant. The kinds are timed one after the other, not all four
    round-robin: a large dense step streams the whole table, its moments and gradient (GBs) and
    slows the step after it, which round-robin made the small sparse step in every round (the
    x0.54 "speed-up at 10x the rows" of an earlier run; timed alone the two sparse sizes take the
    same time). Within the dense pair the small step still follows the large one, which can only
    understate the dense growth.
    """
    variants = []
    for factor in (1, 10):
        cfg = _config(rows_base * factor, 8, 128)
        shape = _table_shape(cfg)
        model = Transformer(cfg.model)
        path = sparse_tables.table_paths(cfg.model)[0]
        dense_tx = optax.adamw(1e-3)
        schedule = optax.constant_schedule(1e-3)
        for kind in ("sparse", "dense"):
            state = _dense_state(cfg, dense_tx)
            memory = sparse_tables.set_path({}, path, _device_table(shape))
            if kind == "sparse":
                table_opt = RowOptimizer(kind="adam", learning_rate=5e-3)
                fn = sparse_tables.make_sparse_train_step(model, dense_tx, table_opt, schedule)
            else:
                table_opt = optim.memory_optimizer(1e-3)
                fn = train_lib.make_train_step(model, (dense_tx, table_opt), schedule)
            state = state.replace(memory=memory, memory_opt_state=table_opt.init(memory))
            step = jax.jit(fn, donate_argnums=0)
            batches = _batches(cfg, warmup + steps)
            for batch in batches[:warmup]:
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            variants.append(
                {"update": kind, "rows": shape[0], "params": shape[0] * shape[1],
                 "step": step, "state": state, "batches": batches[warmup:], "samples": []}
            )  # fmt: skip
    for kind in ("sparse", "dense"):
        pair = [v for v in variants if v["update"] == kind]
        for i, v in ((i, v) for i in range(steps) for v in pair):
            start = time.perf_counter()
            v["state"], metrics = v["step"](v["state"], v["batches"][i])
            jax.block_until_ready((v["state"], metrics))
            v["samples"].append(time.perf_counter() - start)
    results = [
        {"update": v["update"], "rows": v["rows"], "params": v["params"]}
        | {"step_s": statistics.median(v["samples"])}
        for v in variants
    ]
    variants.clear()
    gc.collect()
    return results


def _decoder(
    cfg: config_lib.Config, params: Any, table: jax.Array | np.ndarray, placement: str, tokens: int
) -> tuple[DecodeStep, Callable[[], float]]:
    """A `DecodeStep` of `placement` and a function that runs one greedy batch-1 generation of
    `tokens` tokens and returns its seconds.

    "device": one jitted step with the lookup inside, the table an argument. "host": the rows of
    each token submitted to a `RowGatherer` before the layers below the Engram layer are
    dispatched and gathered while they run, exactly as `generate --table_placement=host`. Hash ids
    are random (fixed seed, the same for both placements) instead of hashed from the sampled
    tokens: no tokenizer, the same row access pattern.
    """
    e = cfg.model.engram
    layer = e.layer_ids[0]
    offsets_1M = head_offsets(engram_table_sizes(cfg.model)[layer])[None]  # [L_e=1, M]
    sizes_M = np.asarray(engram_table_sizes(cfg.model)[layer], np.int64)
    rng = np.random.default_rng(2)
    # [T, 1, L_e=1, 1, M]: the hash ids of every position.
    hash_ids = rng.integers(0, sizes_M, size=(tokens, 1, 1, 1, len(sizes_M))).astype(np.int32)
    vocab = cfg.model.vocab_size
    if placement == "device":
        path = sparse_tables.table_paths(cfg.model)[0]
        # An argument, never a closure: a captured table would be a constant of the program.
        variables = {"params": optim.merge_params(params, sparse_tables.set_path({}, path, table))}
        step = DecodeStep(cfg.model, vocab)
        init_inputs = {"hash_ids": jnp.zeros((1, 1, tokens, e.num_heads), jnp.int32)}
    else:
        gatherer = table_store.RowGatherer(
            table_store.RowCache([table_store.HostRows(table)], 0), threads=False
        )  # as `generate --table_placement=host` builds it
        variables = {"params": params}
        step = DecodeStep(cfg.model, vocab, gatherer, offsets_1M)
        init_inputs = {"engram_rows": jnp.zeros((1, 1, tokens, e.num_heads, e.row_width))}
    cache_shapes = jax.eval_shape(
        step.decoder.init, jax.random.PRNGKey(0), jnp.zeros((1, tokens), jnp.int32), **init_inputs
    )["cache"]

    def generation() -> float:
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)
        token = np.zeros((1, 1), np.int32)
        start = time.perf_counter()
        for i in range(tokens):
            position = np.full((1, 1), i, np.int32)
            logits_BV, cache = step(variables, cache, token, position, hash_ids[i])
            # Greedy decoding needs the token on the host before the next step can start.
            token = np.argmax(np.asarray(logits_BV), axis=-1).astype(np.int32)[:, None]
        return time.perf_counter() - start

    return step, generation


def decode_tokens_per_second(
    cfg: config_lib.Config, params: Any, table: jax.Array, tokens: int, repeats: int = 5
) -> dict[str, dict[str, float]]:
    """Part 3: greedy batch-1 decode tokens/s with the trained `table` on the device and in host
    RAM (`_decoder`), `{"device" | "host": {"tok_s": median tokens/s, "wait": share of the
    timed time spent waiting for rows}}`.

    The host table is `np.asarray(table)`: a view of the same buffer on the CPU backend (no second
    4 GB table), a device-to-host copy on an accelerator. Each placement runs one untimed
    generation (compiles the step and the eager pieces of the loop; without it the first
    placement timed pays them, which made host decoding look 4x faster than device decoding in an
    earlier run), then timed generations alternate between the placements, so a load change on
    a shared machine hits both alike.
    """
    host_table = np.asarray(table)
    runs = {placement: _decoder(cfg, params, t, placement, tokens)
            for placement, t in (("device", table), ("host", host_table))}  # fmt: skip
    seconds: dict[str, list[float]] = {placement: [] for placement in runs}
    for step, generation in runs.values():
        generation()
        step.wait_seconds = 0.0
    for _ in range(repeats):
        for placement, (_, generation) in runs.items():
            seconds[placement].append(generation())
    out = {}
    for placement, (step, _) in runs.items():
        if step.rows is not None:
            step.rows.close()
        out[placement] = {
            "tok_s": tokens / statistics.median(seconds[placement]),
            "wait": step.wait_seconds / sum(seconds[placement]),
        }
    return out


def offload(
    rows_base: int, steps: int, warmup: int, optimizer: str, decode_tokens: int
) -> list[dict[str, Any]]:
    """Parts 2 and 3: training with the table on the device, then in host RAM (the two never
    coexist); decoding with the device-trained table on the device and in host RAM, alternately."""
    cfg = _config(rows_base, 8, 128)
    shape = _table_shape(cfg)
    model = Transformer(cfg.model)
    path = sparse_tables.table_paths(cfg.model)[0]
    batches = _batches(cfg, warmup + steps)
    dense_tx = optax.adamw(1e-3)
    schedule = optax.constant_schedule(1e-3)
    table_opt = RowOptimizer(kind=optimizer, learning_rate=1e-2)
    results = []

    state = _dense_state(cfg, dense_tx)
    memory = sparse_tables.set_path({}, path, _device_table(shape))
    state = state.replace(memory=memory, memory_opt_state=table_opt.init(memory))
    del memory
    step = jax.jit(
        sparse_tables.make_sparse_train_step(model, dense_tx, table_opt, schedule),
        donate_argnums=0,
    )
    seconds, state = _time_device_steps(step, state, batches, warmup)
    del step
    params, table = state.params, sparse_tables.get_path(state.memory, path)
    decode = decode_tokens_per_second(cfg, params, table, decode_tokens)
    results.append({"placement": "device", "step_s": seconds, "wait": 0.0})
    del state, table
    gc.collect()

    tables = host_tables.HostTables({path: _host_table(shape)}, table_opt)
    row_step = jax.jit(sparse_tables.make_row_grad_step(model, dense_tx, schedule))
    trainer = host_tables.HostTableTrainer(tables, row_step)
    host_state = _dense_state(cfg, dense_tx)
    for i, batch in enumerate(batches[:warmup]):
        host_state, metrics = trainer(host_state, batch, batches[i + 1]["memory_ids"])
    jax.block_until_ready(metrics)
    trainer.wait_seconds = 0.0
    samples = []
    for i in range(warmup, len(batches)):
        following = batches[i + 1]["memory_ids"] if i + 1 < len(batches) else None
        start = time.perf_counter()
        host_state, metrics = trainer(host_state, batches[i], following)
        jax.block_until_ready(metrics)
        samples.append(time.perf_counter() - start)
    elapsed = sum(samples)
    trainer.close()
    results.append(
        {
            "placement": "host",
            "step_s": statistics.median(samples),
            "wait": trainer.wait_seconds / elapsed,
        }
    )
    for row in results:
        row["params"] = shape[0] * shape[1]
        row["steps_per_s"] = 1.0 / row["step_s"]
        row["decode_tok_s"] = decode[row["placement"]]["tok_s"]
        row["decode_wait"] = decode[row["placement"]]["wait"]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale_rows_base", type=int, default=100_000)
    parser.add_argument("--offload_rows_base", type=int, default=(1 << 30) // 32 // 4)
    parser.add_argument("--offload_optimizer", default="sgd", choices=("sgd", "adagrad"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--decode_tokens", type=int, default=64)
    args = parser.parse_args(argv)

    print(f"machine: {machine_description()}; load {os.getloadavg()[0]:.1f}")
    scaling = table_scaling(args.scale_rows_base, args.steps, args.warmup)
    print_table(scaling, ["update", "rows", "params", "step_s"])
    offloaded = offload(
        args.offload_rows_base, args.steps, args.warmup, args.offload_optimizer, args.decode_tokens
    )
    print_table(
        offloaded,
        ["placement", "params", "step_s", "steps_per_s", "wait", "decode_tok_s", "decode_wait"],
    )

    def ratio(kind):
        small, large = (r for r in scaling if r["update"] == kind)
        return large["step_s"] / small["step_s"], large["rows"] / small["rows"]

    sparse_ratio, rows_ratio = ratio("sparse")
    dense_ratio, _ = ratio("dense")
    device, host = offloaded
    train_penalty = 100.0 * (host["step_s"] / device["step_s"] - 1.0)
    decode_penalty = 100.0 * (device["decode_tok_s"] / host["decode_tok_s"] - 1.0)
    print(
        f"table scaling: train step x{sparse_ratio:.2f} at {rows_ratio:.0f}x the rows (sparse), "
        f"x{dense_ratio:.1f} (dense)"
    )
    print(
        f"offload penalty: train {train_penalty:.1f}%, decode {decode_penalty:.1f}%, "
        f"table {device['params']} params"
    )


if __name__ == "__main__":
    main()
