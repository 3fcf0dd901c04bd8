"""Engram tables at scale: sparse vs dense table updates, device vs host-RAM tables.

python -m engram_jax.bench.offload                     # ~1.07B-parameter table on the host
python -m engram_jax.bench.offload --offload_rows_base=1000000   # quick look (~128M params)
python -m engram_jax.bench.offload --backbone=toy      # the offload parts on a 2-layer D=64 model

One Engram layer (W = 32, M = 4 heads, batch 8 x 128 tokens) in a small Transformer, three parts,
side by side in one process:

1. Table scaling (backbone "toy", so the table's cost is not hidden by the layers). Step time with
   the table at `--scale_rows_base` and 10x that many rows, same model otherwise, with sparse lazy
   Adam (`table_update="sparse"`) and with whole-table optax Adam (`"dense"`). The ratio
   large/small is what the sparse path removes: the dense step reads and writes every row, its
   moments and a table-sized gradient.
2. Training offload (backbone `--backbone`, default "small": 8 layers, D = 512). Steps/s with the
   ~1B-parameter table on the device vs in host RAM (`host_tables.HostTableTrainer`: rows of step
   t+1 gathered while step t runs, overlapped host updates), both with `--offload_optimizer` (SGD:
   no table-sized optimizer state, so the run fits a 24 GiB machine), stepped in alternating
   blocks. "wait" is the share of the host run spent waiting for rows before a step could be
   dispatched (the blocking share the offload demos report).
3. Decode offload. Greedy batch-1 decoding of `--decode_tokens` tokens with the trained table on
   the device vs in host RAM, through `engram_jax.generate.DecodeStep`, the step `generate` runs:
   one jitted step with the lookup inside for device tables; for host tables `DecodeStep`'s
   default ("host": on the CPU backend, gather the token's rows, then one program on them) and
   the forced prefetching split ("host split": rows submitted, the layers below the Engram layer
   dispatched, the rows gathered while they run, the layers from the Engram layer on dispatched
   with them). "wait" is the share of decoding spent in the gather. The host table is a view of
   the device-trained table's buffer (CPU backend; a device-to-host copy on an accelerator), so
   the placements' generations alternate after one warm-up generation each, and the medians
   compare like with like.

   Why not the whole `generate.Generator`: it loads a checkpoint, so the ~1B-parameter table would
   first be written as one (with its optimizer state at initialisation: several times the 4.3 GB
   table in RAM and on disk) and read back per placement, which a 24 GiB machine does not afford
   within a bench run. What `Generator` adds around `DecodeStep` (tokenizer, n-gram hashing of the
   history, sampling) is the same for every placement; `engram_jax.bench.offload_decode` times the
   whole `Generator` per placement on smaller tables (`measure_decode`).

The offload penalty is the host path's extra time per step over the step's time, so it depends on
the backbone: the toy backbone's 0.2 ms decode step shows every microsecond of host bookkeeping,
the small one is closer to the models the offload claim is about (a table many times the dense
model). The device and host training tables coexist in part 2 (each drawn block by block: about
2 x 4.3 GB plus the dense model at 1.07B parameters); the host one is freed before decoding.
Batches are random token and hash ids (the row access pattern of hashed n-grams is close to
uniform). The last two lines are the summary.
"""

from __future__ import annotations

import argparse
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
from engram_jax import optim
from engram_jax import train as train_lib
from engram_jax.bench._timing import machine_description, print_table
from engram_jax.engram import head_offsets
from engram_jax.generate import DecodeStep
from engram_jax.model import Transformer, engram_table_sizes
from engram_jax.tables import device_step, host_tables, initializers, row_files
from engram_jax.tables.row_optim import RowOptimizer

# Backbones around the Engram layer. The offload penalty is the host's per-step cost over the
# step's time, so it depends on the backbone: "toy" (2 layers, D = 64) has a 0.2 ms decode step on
# this CPU, where any fixed per-token cost of the host path shows at full size; "small" (8 layers,
# D = 512, vocabulary 8192, 34M dense parameters) keeps the proportions of the paper's offload
# experiment (a 1B table on 34M dense parameters here, 100B on 4B or 8B there; the Engram layer
# after the first block, as there). Both keep the same Engram layer (W = 32, M = 4 heads).
BACKBONES = {
    "toy": {"num_layers": 2, "hidden_size": 64, "mlp_hidden_size": 128, "vocab_size": 1024,
            "num_heads": 2, "num_kv_heads": 1, "head_dim": 32},
    "small": {"num_layers": 8, "hidden_size": 512, "mlp_hidden_size": 1536, "vocab_size": 8192,
              "num_heads": 8, "num_kv_heads": 4, "head_dim": 64},
}  # fmt: skip


def _config(rows_base: int, batch: int, seq: int, backbone: str = "toy") -> config_lib.Config:
    shape = BACKBONES[backbone]
    c = config_lib.base_config()
    c.batch_size, c.seq_len = batch, seq
    m = c.model
    m.vocab_size = shape["vocab_size"]
    m.num_layers = m.num_dense_layers = shape["num_layers"]
    m.hidden_size = shape["hidden_size"]
    m.mlp_hidden_size = shape["mlp_hidden_size"]
    m.attention.num_heads = shape["num_heads"]
    m.attention.num_kv_heads = shape["num_kv_heads"]
    m.attention.head_dim = shape["head_dim"]
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


def _table(path: tuple[str, ...], shape: tuple[int, int], *, on_host: bool = False) -> Any:
    """The trainer's own N(0, 1) table (`tables.initializers`, keyed by the table's path): built
    in row chunks, so the peak is the table plus a chunk (one `jax.random.normal` of the whole
    table would hold ~4x the table at 1B parameters); on the host, the same values in numpy."""
    key = initializers.table_key(jax.random.PRNGKey(0), "/".join(path))
    if on_host:
        return initializers.init_host_table(key, shape)
    return initializers.init_table(key, shape)


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
        path = device_step.table_paths(cfg.model)[0]
        dense_tx = optax.adamw(1e-3)
        schedule = optax.constant_schedule(1e-3)
        for kind in ("sparse", "dense"):
            state = _dense_state(cfg, dense_tx)
            memory = device_step.set_path({}, path, _table(path, shape))
            if kind == "sparse":
                table_opt = RowOptimizer(kind="adam", learning_rate=5e-3)
                fn = device_step.make_sparse_train_step(model, dense_tx, table_opt, schedule)
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

    "device": one jitted step with the lookup inside, the table an argument. "host": the step
    `generate --table_placement=host` runs (`DecodeStep`'s default: on the CPU backend the rows
    are gathered, then one program runs on them; on an accelerator the split below). "host split":
    forced split, the rows submitted to a `RowGatherer` before the layers below the Engram layer
    are dispatched and gathered while they run. Hash ids are random (fixed seed, the same for
    every placement) instead of hashed from the sampled tokens: no tokenizer, the same row access
    pattern.
    """
    layer = cfg.model.engram.layer_ids[0]
    offsets_1M = head_offsets(engram_table_sizes(cfg.model)[layer])[None]  # [L_e=1, M]
    sizes_M = np.asarray(engram_table_sizes(cfg.model)[layer], np.int64)
    rng = np.random.default_rng(2)
    # [T, 1, L_e=1, 1, M]: the hash ids of every position.
    hash_ids = rng.integers(0, sizes_M, size=(tokens, 1, 1, 1, len(sizes_M))).astype(np.int32)
    vocab = cfg.model.vocab_size
    if placement == "device":
        path = device_step.table_paths(cfg.model)[0]
        # An argument, never a closure: a captured table would be a constant of the program.
        variables = {"params": optim.merge_params(params, device_step.set_path({}, path, table))}
        step = DecodeStep(cfg.model, vocab)
    else:
        gatherer = row_files.RowGatherer(
            row_files.RowCache([row_files.HostRows(table)], 0), threads=False
        )  # as `generate --table_placement=host` builds it
        variables = {"params": params}
        split = True if placement == "host split" else None
        step = DecodeStep(cfg.model, vocab, gatherer, offsets_1M, split=split)

    def generation() -> float:
        cache = step.empty_cache(tokens)
        token = np.zeros((1, 1), np.int32)
        start = time.perf_counter()
        for i in range(tokens):
            position = np.full((1, 1), i, np.int32)
            logits_BV, cache = step(variables, cache, token, position, hash_ids[i])
            # Greedy decoding needs the token on the host before the next step can start.
            token = np.argmax(np.asarray(logits_BV), axis=-1).astype(np.int32)[:, None]
        return time.perf_counter() - start

    return step, generation


DECODE_PLACEMENTS = ("device", "host", "host split")


def paired_ratio(times: list[float], reference: list[float]) -> dict[str, Any]:
    """Median of `times[i] / reference[i]` over pairs timed next to each other (the same step, or
    the same round of generations), with the interquartile range of those ratios: a drift of the
    machine's speed between rounds cancels within each pair, where a ratio of two medians keeps
    it. Run-to-run noise remains (decode penalties of 4.5% and 1.5% in two runs of the same code,
    interquartile ranges about +-4%), so the range is printed with the ratio."""
    ratios = [t / r for t, r in zip(times, reference, strict=True)]
    low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"vs_device": statistics.median(ratios), "iqr": f"{low:.3f}-{high:.3f}"}


def decode_tokens_per_second(
    cfg: config_lib.Config, params: Any, table: jax.Array, tokens: int, repeats: int = 15
) -> dict[str, dict[str, float]]:
    """Part 3: greedy batch-1 decode tokens/s with the trained `table` on the device and in host
    RAM (`_decoder`), `{placement: {"tok_s": median tokens/s, "vs_device", "iqr": the
    generation's time over the device's in the same round (`paired_ratio`), "wait": share of the
    timed time spent waiting for rows, "split": whether the step was split}}` for
    `DECODE_PLACEMENTS`.

    The host table is `np.asarray(table)`: a view of the same buffer on the CPU backend (no second
    4 GB table), a device-to-host copy on an accelerator. Each placement runs one untimed
    generation (compiles the step and the eager pieces of the loop; without it the first
    placement timed pays them, which made host decoding look 4x faster than device decoding in an
    earlier run), then timed generations alternate between the placements, so a load change on
    a shared machine hits both alike.
    """
    host_table = np.asarray(table)
    runs = {
        placement: _decoder(cfg, params, table if placement == "device" else host_table,
                            placement, tokens)
        for placement in DECODE_PLACEMENTS
    }  # fmt: skip
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
            **paired_ratio(seconds[placement], seconds["device"]),
            "wait": step.wait_seconds / sum(seconds[placement]),
            "split": getattr(step, "split", False),
        }
    return out


# Training steps per placement between switches (part 2): long enough for the host trainer's
# pipeline (rows of step t+1 gathered while step t runs) to be in its steady state.
BLOCK_STEPS = 5


def _interleaved_samples(
    runs: dict[str, Callable[[int], None]], warmup: int, num_steps: int, trainer
) -> dict[str, list[float]]:
    """Seconds of each step after `warmup` untimed ones, per placement, in alternating blocks of
    `BLOCK_STEPS` steps; the host trainer's wait is counted from the first timed step."""
    for i in range(warmup):
        for run in runs.values():
            run(i)
    trainer.wait_seconds = 0.0
    samples: dict[str, list[float]] = {placement: [] for placement in runs}
    for first in range(warmup, num_steps, BLOCK_STEPS):
        for placement, run in runs.items():
            for i in range(first, min(first + BLOCK_STEPS, num_steps)):
                start = time.perf_counter()
                run(i)
                samples[placement].append(time.perf_counter() - start)
    return samples


def offload(
    rows_base: int,
    steps: int,
    warmup: int,
    optimizer: str,
    decode_tokens: int,
    backbone: str,
    decode_repeats: int = 15,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Parts 2 and 3: training with the table on the device and in host RAM, in alternating
    blocks of `BLOCK_STEPS` steps (a load change on a shared machine hits both placements alike;
    timing them one after the other gave train penalties of -1.2%, -17.0% and -16.1% for the same
    code under load); then decoding with the device-trained table on the device and in host RAM.
    Returns the training rows (one per placement) and `decode_tokens_per_second`'s result."""
    cfg = _config(rows_base, 8, 128, backbone)
    shape = _table_shape(cfg)
    model = Transformer(cfg.model)
    path = device_step.table_paths(cfg.model)[0]
    batches = _batches(cfg, warmup + steps)
    dense_tx = optax.adamw(1e-3)
    schedule = optax.constant_schedule(1e-3)
    table_opt = RowOptimizer(kind=optimizer, learning_rate=1e-2)

    # Both placements' tables coexist here (2 x 4.3 GB at 1B parameters): the interleaving
    # needs both, and each is drawn block by block.
    memory = device_step.set_path({}, path, _table(path, shape))
    device = {
        "state": _dense_state(cfg, dense_tx).replace(
            memory=memory, memory_opt_state=table_opt.init(memory)
        ),
        "step": jax.jit(
            device_step.make_sparse_train_step(model, dense_tx, table_opt, schedule),
            donate_argnums=0,
        ),
    }
    del memory
    host = {
        "state": _dense_state(cfg, dense_tx),
        "trainer": host_tables.HostTableTrainer(
            host_tables.HostTables({path: _table(path, shape, on_host=True)}, table_opt),
            jax.jit(device_step.make_row_grad_step(model, dense_tx, schedule)),
        ),
    }

    def run_device(i: int) -> None:
        device["state"], metrics = device["step"](device["state"], batches[i])
        jax.block_until_ready((device["state"], metrics))

    def run_host(i: int) -> None:
        following = batches[i + 1] if i + 1 < len(batches) else None
        host["state"], metrics = host["trainer"](host["state"], batches[i], following)
        jax.block_until_ready(metrics)

    runs = {"device": run_device, "host": run_host}
    samples = _interleaved_samples(runs, warmup, len(batches), host["trainer"])
    host["trainer"].close()
    host_wait = host["trainer"].wait_seconds / sum(samples["host"])
    host.clear()  # frees the host table before decoding
    gc.collect()

    state = device.pop("state")
    params, table = state.params, device_step.get_path(state.memory, path)
    decode = decode_tokens_per_second(cfg, params, table, decode_tokens, decode_repeats)
    del state, table
    gc.collect()
    # Step i of the two placements ran in neighbouring blocks: paired by step.
    results = [
        {"placement": placement, "params": shape[0] * shape[1]}
        | {"step_s": statistics.median(samples[placement])}
        | {"steps_per_s": 1.0 / statistics.median(samples[placement])}
        | paired_ratio(samples[placement], samples["device"])
        | {"wait": host_wait if placement == "host" else 0.0}
        for placement in runs
    ]
    return results, decode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale_rows_base", type=int, default=100_000)
    parser.add_argument("--offload_rows_base", type=int, default=(1 << 30) // 32 // 4)
    parser.add_argument("--offload_optimizer", default="sgd", choices=("sgd", "adagrad"))
    parser.add_argument(
        "--backbone", default="small", choices=sorted(BACKBONES),
        help="dense layers around the Engram layer in parts 2 and 3 (part 1 always uses 'toy')",
    )  # fmt: skip
    # Per-step and per-token differences between placements are a few percent, about this
    # machine's drift within a run: 20 steps (4 blocks of 5 per placement) and 15 rounds of
    # generations give paired ratios whose printed interquartile range says how far to trust them.
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--decode_tokens", type=int, default=64)
    parser.add_argument("--decode_repeats", type=int, default=15)
    args = parser.parse_args(argv)

    print(f"machine: {machine_description()}; load {os.getloadavg()[0]:.1f}")
    scaling = table_scaling(args.scale_rows_base, args.steps, args.warmup)
    print_table(scaling, ["update", "rows", "params", "step_s"])
    trained, decoded = offload(
        args.offload_rows_base, args.steps, args.warmup, args.offload_optimizer,
        args.decode_tokens, args.backbone, args.decode_repeats,
    )  # fmt: skip
    print(f"backbone {args.backbone!r}: {BACKBONES[args.backbone]}")
    print_table(
        trained, ["placement", "params", "step_s", "steps_per_s", "vs_device", "iqr", "wait"]
    )
    print_table(
        [{"placement": p} | decoded[p] for p in DECODE_PLACEMENTS],
        ["placement", "split", "tok_s", "vs_device", "iqr", "wait"],
    )
    print(f"load {os.getloadavg()[0]:.1f}")

    def ratio(kind):
        small, large = (r for r in scaling if r["update"] == kind)
        return large["step_s"] / small["step_s"], large["rows"] / small["rows"]

    sparse_ratio, rows_ratio = ratio("sparse")
    dense_ratio, _ = ratio("dense")
    device, host = trained
    # Paired time ratios (step time, generation time) of host over device placement.
    train_penalty = 100.0 * (host["vs_device"] - 1.0)
    decode_penalty = 100.0 * (decoded["host"]["vs_device"] - 1.0)
    print(
        f"table scaling: train step x{sparse_ratio:.2f} at {rows_ratio:.0f}x the rows (sparse), "
        f"x{dense_ratio:.1f} (dense)"
    )
    print(
        f"offload penalty: train {train_penalty:.1f}%, decode {decode_penalty:.1f}%, "
        f"table {device['params']} params"
    )


if __name__ == "__main__":
    from engram_jax import cli

    cli.call(main)
