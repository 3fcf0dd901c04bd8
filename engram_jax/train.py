"""`python -m engram_jax.train --config=configs/<name>.py --workdir=DIR`: the training program.

The host reads, tokenises, packs and hashes the data (Engram addresses depend only on tokens, so
the accelerator never hashes); one compiled `train_step` updates the dense parameters with AdamW
and the Engram tables with their own optimizer; orbax checkpoints keep the dense state, the memory
tables and the data-iterator position as separate items, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import config as config_lib
from engram_jax import corpus as corpus_lib
from engram_jax import data as data_lib
from engram_jax import metrics as metrics_lib
from engram_jax import (
    optim,
    preemption,
    profiling,
    sharding,
    storage,
)
from engram_jax import plot as plot_lib
from engram_jax.accounting import account, format_accounting
from engram_jax.hashing import tokenizer_fingerprint
from engram_jax.mhc import amax_gain, mixing_stats
from engram_jax.model import MOE_BIAS, Transformer, cross_entropy_loss, mixing_matrices
from engram_jax.overencoding_ids import OverEncodingIds
from engram_jax.tables import device_step, host_tables, initializers, row_optim
from engram_jax.workdir_lock import WorkdirLock

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
# Checkpoint metadata entries that must match for a restore to mean the same thing.
_MUST_MATCH = ("model", "tokenizer_fingerprint", "compressed_tokenizer_fingerprint", "hasher")
# Model keys that change how a step is computed but not what the parameters are: a resume may
# change them (the restore names each change). `scan_layers` is not one of them: it stacks the
# blocks' parameters into [L, ...] leaves, another tree. The mesh is not in the model config.
COMPUTE_ONLY_KEYS = (
    "model.dtype",
    "model.remat",
    "model.attention.implementation",
    # How tokens reach the experts, not what the experts are: the parameters are the same.
    "model.moe.dispatch",
    "model.moe.block_size",
    "model.moe.capacity_factor",
)
# What the tokenizer alone decides; checked before the workdir is written to.
_TOKENIZER_MUST_MATCH = ("model", "tokenizer_fingerprint")


class ProcessMismatchError(RuntimeError):
    """Processes of one job disagree on what the tokens or table rows mean."""


@flax.struct.dataclass
class TrainState:
    """Everything that changes between steps; a checkpoint saves exactly this (plus the data).

    `params` are the dense parameters, `memory` the Engram tables (separate checkpoint item),
    `moe_bias` the MoE balancing biases (outside the gradient).
    """

    step: jax.Array
    params: Any
    memory: Any
    opt_state: Any
    memory_opt_state: Any
    moe_bias: Any


@dataclasses.dataclass
class DataSetup:
    """The host-side data pieces built from the config."""

    tokenizer: Any
    spec: data_lib.DataSpec
    engram: data_lib.EngramHashSpec | None
    corpus: corpus_lib.Corpus  # files and split; each process streams its own shard
    # Batch groups per process whose table rows are deduplicated apart (the data-parallel shards).
    memory_shards: int = 1

    @property
    def train_documents(self) -> list[str]:
        """The whole training split as a list (reads the corpus: for small corpora)."""
        return list(self.corpus.documents("train"))

    @property
    def eval_documents(self) -> list[str]:
        """The whole held-out split as a list (reads the corpus: for small corpora)."""
        return list(self.corpus.documents("eval"))

    def metadata(self) -> dict[str, Any]:
        """Fingerprints of everything that decides what a token id and a table row mean."""
        meta = {
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
            "compressed_tokenizer_fingerprint": "",
            "hasher": "",
        }
        if self.engram is not None:
            meta["compressed_tokenizer_fingerprint"] = self.engram.compressor.fingerprint()
            meta["hasher"] = self.engram.hasher.fingerprint()
        return meta


# ------------------------------------------------------------------------------------------------
# Building blocks.
# ------------------------------------------------------------------------------------------------


def token_specs(
    cfg: config_lib.Config, tokenizer: Any, cache_dir: str | None = None
) -> tuple[data_lib.DataSpec, data_lib.EngramHashSpec | None]:
    """The token ids' spec (pad, eos, byte lengths) and, with Engram on, the compressor and hasher
    the config describes (`cache_dir` caches the compressed-token table)."""
    spec = data_lib.make_data_spec(
        tokenizer,
        pad_id=cfg.model.pad_id,
        vocab_size=cfg.model.vocab_size,
        eos_token=cfg.train.eos_token,
    )
    e = cfg.model.engram
    if not e.enabled:
        return spec, None
    engram = data_lib.make_engram_hash_spec(
        tokenizer,
        spec,
        vocab_bases=e.table_rows_per_head,
        max_ngram=e.max_ngram,
        heads_per_ngram=e.heads_per_ngram,
        layer_ids=e.layer_ids,
        seed=e.hash_seed,
        cache_dir=cache_dir,
    )
    return spec, engram


def build_data(
    cfg: config_lib.Config,
    workdir: str,
    *,
    check_tokenizer: Callable[[Any], None] | None = None,
    checkpoint_tokenizer: str | None = None,
) -> DataSetup:
    """Lists the corpus (documents are read later, each process its own shard), the job's one
    tokenizer and the Engram hashing of the configured layers.

    Process 0 loads `tokenizer_path`, or reuses the BPE cached in the workdir for this corpus, or
    trains one; calls `check_tokenizer(tokenizer)` (the trainer's checkpoint-compatibility check,
    run before anything is written); then writes `<workdir>/tokenizer.json` (and the BPE cache).
    The other processes wait for it and load that file. Every process then checks that its
    tokenizer and hashing fingerprints equal process 0's (`ProcessMismatchError` names the one
    that differs).

    `checkpoint_tokenizer`, the tokenizer fingerprint of the checkpoint a run resumes, makes
    process 0 take `<workdir>/tokenizer.json` when it is that tokenizer (and no `tokenizer_path`
    is set): a resume never depends on training the same BPE again (another `tokenizers` version,
    sample or corpus listing could train another one).
    """
    corpus = corpus_lib.Corpus(
        cfg.train.data_path, cfg.train.eval_fraction, cfg.train.eval_data_path
    )
    workdir_tokenizer = storage.join(workdir, TOKENIZER_FILE)

    def process_zero() -> Any:
        tokenizer = cache_path = None
        if (
            checkpoint_tokenizer
            and not cfg.train.tokenizer_path
            and storage.exists(workdir_tokenizer)
        ):
            saved = data_lib.load_tokenizer(workdir_tokenizer)
            if tokenizer_fingerprint(saved) == checkpoint_tokenizer:
                logger.info("resuming with the checkpoint's tokenizer %s", workdir_tokenizer)
                tokenizer = saved
        if tokenizer is None:
            tokenizer, cache_path = _load_or_train_tokenizer(cfg, workdir, corpus)
        if check_tokenizer is not None:
            check_tokenizer(tokenizer)
        text = tokenizer.to_str()
        if cache_path is not None:
            storage.write_text(cache_path, text)
            logger.info("saved the trained tokenizer to %s", cache_path)
        # What `engram_jax.generate` loads; the checkpoint's fingerprint guards it. Unchanged
        # bytes are not rewritten.
        if not storage.exists(workdir_tokenizer) or storage.read_text(workdir_tokenizer) != text:
            storage.write_text(workdir_tokenizer, text)
        return tokenizer

    tokenizer = run_on_process_zero(process_zero, "preparing the tokenizer")
    if jax.process_index() != 0:
        tokenizer = data_lib.load_tokenizer(workdir_tokenizer)
    # The compressed-token table is cached next to a local workdir; with a URL it is rebuilt.
    cache_dir = None if storage.is_url(workdir) else os.path.join(workdir, "tokenizer")
    spec, engram = token_specs(cfg, tokenizer, cache_dir=cache_dir)
    setup = DataSetup(tokenizer, spec, engram, corpus)
    check_processes_agree(setup.metadata())
    return setup


def _load_or_train_tokenizer(
    cfg: config_lib.Config, workdir: str, corpus: corpus_lib.Corpus
) -> tuple[Any, str | None]:
    """The configured tokenizer, the BPE cached in the workdir for this corpus, or a new BPE
    trained on a bounded sample of it (`tokenizer_train_bytes`); with the cache path to write it
    to when it was trained now (nothing is written here)."""
    t = cfg.train
    if t.tokenizer_path:
        return data_lib.load_tokenizer(t.tokenizer_path), None
    # Named by the corpus fingerprint and the sample size, not by hashing every document.
    key = hashlib.sha256(
        f"{corpus.fingerprint}\n{t.eval_fraction}\n{t.tokenizer_train_bytes}\n"
        f"{cfg.model.vocab_size}".encode()
    ).hexdigest()[:20]
    cache_path = storage.join(workdir, "tokenizer", f"bpe-{key}", TOKENIZER_FILE)
    if storage.exists(cache_path):
        logger.info("reusing the tokenizer trained on this corpus: %s", cache_path)
        return data_lib.load_tokenizer(cache_path), None
    logger.info(
        "training a byte-level BPE (vocab_size=%d) on a sample of up to %d bytes",
        cfg.model.vocab_size,
        t.tokenizer_train_bytes,
    )
    sample = corpus.sample(t.tokenizer_train_bytes)
    return data_lib.train_bpe_tokenizer(sample, cfg.model.vocab_size), cache_path


_MESSAGE_BYTES = 4096


def run_on_process_zero(fn: Callable[[], Any], what: str) -> Any:
    """Runs `fn` on process 0 only and returns its result there (None elsewhere).

    Every process returns only once process 0 has finished (a barrier); when `fn` raised, process
    0 re-raises it and the others raise a RuntimeError quoting it, so no process is left waiting
    at a later collective.
    """
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    if jax.process_count() > 1:
        message = b"" if error is None else f"{type(error).__name__}: {error}".encode()
        message = message[:_MESSAGE_BYTES]
        encoded = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
        encoded[0] = error is not None
        encoded[1 : 1 + len(message)] = np.frombuffer(message, np.uint8)
        received = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
        if jax.process_index() != 0 and received[0]:
            text = bytes(received[1:]).rstrip(b"\0").decode("utf-8", "replace")
            raise RuntimeError(f"process 0 failed while {what}: {text}")
    if error is not None:
        raise error
    return result


def check_processes_agree(fingerprints: dict[str, str]) -> None:
    """Raises `ProcessMismatchError` on every process when any process's fingerprints differ from
    process 0's, naming each such process and fingerprint. A no-op with one process."""
    if jax.process_count() == 1:
        return
    names = sorted(fingerprints)
    local = np.stack(  # [F, 32] sha256 of each fingerprint string
        [np.frombuffer(hashlib.sha256(fingerprints[n].encode()).digest(), np.uint8) for n in names]
    )
    gathered = np.asarray(multihost_utils.process_allgather(local))  # [P, F, 32]
    differences = [
        f"process {p}: {names[f]}"
        for p in range(1, gathered.shape[0])
        for f in range(len(names))
        if not np.array_equal(gathered[p, f], gathered[0, f])
    ]
    if differences:
        raise ProcessMismatchError(
            "processes disagree with process 0 on what tokens and table rows mean ("
            + "; ".join(differences)
            + "): every process must load the same tokenizer and hashing configuration"
        )


def make_batches(
    setup: DataSetup, cfg: config_lib.Config, *, train: bool, data_shards: int | None = None
) -> ShardedBatches:
    """This process's share of the training stream (endless, shuffled) or the eval stream.

    The training stream is cut into `data_shards` logical shards (default: the process count),
    each a pipeline of `batch_size / data_shards` rows; a process reads its contiguous range of
    shards and concatenates their rows. A run keeps the shard count of its first start, so a
    resume on another process count (every count dividing it) continues the very same batches.
    """
    count, index = jax.process_count(), jax.process_index()
    shards = count if data_shards is None or not train else data_shards
    if shards % count or cfg.train.batch_size % shards:
        raise ValueError(
            f"data_shards: got {shards}; expected a multiple of the {count} processes that "
            f"divides batch_size={cfg.train.batch_size}"
        )
    mine = range(index * shards // count, (index + 1) * shards // count)
    t = cfg.train
    # The process's row groups of sparse table updates, split among its logical shards.
    memory_shards = max(1, setup.memory_shards // len(mine))
    return ShardedBatches(
        {
            shard: data_lib.make_pipeline(
                document_stream(setup, cfg, train=train, shard_index=shard, shard_count=shards),
                setup.tokenizer,
                setup.spec,
                seq_len=t.seq_len,
                batch_size=t.batch_size // shards,
                seed=t.seed,
                add_eos=setup.spec.eos_id is not None,
                engram=setup.engram,
                worker_count=t.data_workers if train else 0,
                prefetch=t.data_prefetch,
                shuffle_window=t.shuffle_window,
                memory_shards=memory_shards,
                overencoding=OverEncodingIds.from_model_config(cfg.model),
            )
            for shard in mine
        }
    )


def document_stream(
    setup: DataSetup,
    cfg: config_lib.Config,
    *,
    train: bool,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> corpus_lib.DocumentStream:
    """The documents of one data shard (default: this process's) of the train or eval split."""
    return setup.corpus.stream(
        "train" if train else "eval",
        shard_index=jax.process_index() if shard_index is None else shard_index,
        shard_count=jax.process_count() if shard_count is None else shard_count,
        seed=cfg.train.seed,
        shuffle=train,
        num_epochs=num_epochs,
    )


class ShardedBatches:
    """The batches of several logical data shards, rows concatenated in shard order.

    `get_state()` is `{"shards": {"<shard>": grain iterator state}}`; `set_state` takes the
    states of (at least) this process's shards, whichever processes saved them.
    """

    def __init__(self, iterators: dict[int, Any]):
        self._iterators = iterators

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(iterator) for iterator in self._iterators.values()]
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def get_state(self) -> dict[str, Any]:
        return {"shards": {str(k): it.get_state() for k, it in self._iterators.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state["shards"]
        missing = [k for k in self._iterators if str(k) not in saved]
        if missing:
            raise ValueError(
                f"data state: no saved state for shards {missing} (saved {sorted(saved)})"
            )
        for shard, iterator in self._iterators.items():
            iterator.set_state(saved[str(shard)])


def make_optimizers(cfg: config_lib.Config) -> tuple[optax.GradientTransformation, ...]:
    """Dense AdamW and the Engram tables' optimizer (docs/design.md §1.11): a row-wise
    `row_optim.RowOptimizer` with `table_update="sparse"`, else whole-table optax Adam."""
    t = cfg.train
    schedule = optim.learning_rate_schedule(
        t.learning_rate,
        t.warmup_steps,
        t.num_train_steps,
        kind=t.schedule,
        final_fraction=t.final_lr_fraction,
        decay_fraction=t.decay_fraction,
    )
    dense = optim.dense_optimizer(
        schedule,
        weight_decay=t.weight_decay,
        b1=t.adam_b1,
        b2=t.adam_b2,
        eps=t.adam_eps,
        clip_norm=t.clip_norm or None,
    )
    if t.table_update == "sparse" and device_step.has_memory_tables(cfg.model):
        return dense, row_optim.from_config(cfg, schedule), schedule
    memory = optim.memory_optimizer(
        schedule,
        lr_multiplier=cfg.model.engram.table_lr_multiplier,
        b1=t.adam_b1,
        b2=t.adam_b2,
        eps=t.adam_eps,
        weight_decay=cfg.model.engram.table_weight_decay,
    )
    return dense, memory, schedule


def _dummy_inputs(cfg: config_lib.Config, batch_size: int) -> tuple[jax.Array, ...]:
    # Parameter shapes do not depend on the length: one position keeps the init forward cheap.
    t = 1
    tokens = jnp.zeros((batch_size, t), jnp.int32)
    hash_ids = None
    e = cfg.model.engram
    if e.enabled:
        hash_ids = jnp.zeros((batch_size, len(e.layer_ids), t, e.num_heads), jnp.int32)
    return tokens, None, None, hash_ids


def init_train_state(
    model: Transformer,
    cfg: config_lib.Config,
    txs: tuple[optax.GradientTransformation, optax.GradientTransformation],
    rng: jax.Array,
    batch_size: int = 1,
) -> TrainState:
    """A fresh state with logically boxed leaves (unbox it, or use `create_train_state`).

    `batch_size` of the dummy init batch must split over the mesh's batch axes.
    """
    dense_tx, memory_tx = txs
    variables = model.init(rng, *_dummy_inputs(cfg, batch_size))
    params, memory = optim.partition_params(variables["params"])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        memory=memory,
        # Initialised on the boxed parameters so the moments inherit their logical axes (and so
        # their shardings) instead of being replicated.
        opt_state=dense_tx.init(params),
        memory_opt_state=memory_tx.init(memory),
        moe_bias=variables.get(MOE_BIAS, {}),
    )


def create_train_state(
    model: Transformer,
    cfg: config_lib.Config,
    txs: tuple[optax.GradientTransformation, optax.GradientTransformation],
    mesh: jax.sharding.Mesh,
    *,
    table_placement: str = "device",
) -> tuple[TrainState, Any]:
    """Initialises the state directly into its shardings (abstract shapes first, nothing
    full-size on one device) and returns it with the state's sharding tree.

    With `table_placement="host"` the tables are numpy arrays in host RAM with the same values
    (`initializers.init_host_tables`, block by block) and the state holds no table optimizer state
    (`memory_opt_state={}`: `host_tables.HostTables` keeps its own), so nothing table-sized is
    ever built on a device: host tables are for tables that do not fit there.
    """

    batch_shards = sharding.batch_shards(mesh)

    def init(rng: jax.Array) -> TrainState:
        return init_train_state(model, cfg, txs, rng, batch_size=batch_shards)

    rng = jax.random.PRNGKey(cfg.train.seed)
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.tree_shardings(abstract, mesh)
    # The tables leave the jitted init (XLA drops their unused generation) and are built in row
    # chunks per shard: a whole-table normal costs ~4x the table in memory (tables/initializers.py).
    if table_placement not in ("device", "host"):
        raise ValueError(
            f"create_train_state: table_placement={table_placement!r}; expected 'device' or 'host'"
        )
    on_host = table_placement == "host"
    dropped = {"memory": {}, "memory_opt_state": {}} if on_host else {"memory": {}}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        state = jax.jit(
            lambda key: nn.meta.unbox(init(key)).replace(**dropped),
            out_shardings=shardings.replace(**dropped),
        )(rng)
    std = cfg.model.engram.table_init_std
    abstract_tables = nn.meta.unbox(abstract.memory)
    if on_host:
        memory = initializers.init_host_tables(rng, abstract_tables, std)
    else:
        memory = initializers.init_tables(rng, abstract_tables, shardings.memory, std)
    return state.replace(memory=memory), shardings


def _gate_and_load_metrics(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    metrics = {}
    if "engram_gates" in aux:
        gates = aux["engram_gates"]  # [L_e, B, T, G]
        metrics["engram_gate_mean"] = jnp.mean(gates)
        metrics["engram_gate_std"] = jnp.std(gates)
        for i in range(gates.shape[0]):
            metrics[f"engram_gate_mean/layer_{i}"] = jnp.mean(gates[i])
    if "moe_load" in aux:
        load = aux["moe_load"]  # [L_moe, E]
        metrics["moe_max_violation"] = jnp.mean(jnp.max(load, axis=-1) * load.shape[-1] - 1.0)
        metrics["moe_balance_loss"] = aux["moe_balance_loss"]
    return metrics


def make_train_step(
    model: Transformer,
    txs: tuple[optax.GradientTransformation, optax.GradientTransformation],
    schedule: optax.Schedule,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step: loss, gradients of dense and memory parameters, both optimizer updates and
    the MoE bias update (inside `apply`, outside the gradient). Jit it once at the call site."""
    dense_tx, memory_tx = txs
    if isinstance(memory_tx, row_optim.RowOptimizer):
        return device_step.make_sparse_train_step(model, dense_tx, memory_tx, schedule)

    def loss_fn(params, memory, moe_bias, batch):
        variables = {"params": optim.merge_params(params, memory), MOE_BIAS: moe_bias}
        (logits, aux), updated = model.apply(
            variables,
            batch["inputs"],
            batch["positions"],
            batch["segment_ids"],
            batch.get("hash_ids"),
            # Padding stays out of the MoE load, balance loss and bias update.
            token_mask_BT=batch["loss_mask"],
            mutable=[MOE_BIAS],
        )
        loss, _ = cross_entropy_loss(logits, batch["targets"], batch["loss_mask"])
        total = loss + aux.get("moe_balance_loss", 0.0)
        return total, (loss, aux, updated.get(MOE_BIAS, {}))

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (_, (loss, aux, moe_bias)), (dense_grads, memory_grads) = grad_fn(
            state.params, state.memory, state.moe_bias, batch
        )
        updates, opt_state = dense_tx.update(dense_grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        memory_updates, memory_opt_state = memory_tx.update(
            memory_grads, state.memory_opt_state, state.memory
        )
        memory = optax.apply_updates(state.memory, memory_updates)
        metrics = {
            "train_loss": loss,
            "grad_norm": optax.tree.norm(dense_grads),
            "memory_grad_norm": optax.tree.norm(memory_grads),
            "learning_rate": schedule(state.step),
            **_gate_and_load_metrics(aux),
        }
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            memory=memory,
            opt_state=opt_state,
            memory_opt_state=memory_opt_state,
            moe_bias=moe_bias,
        )
        return new_state, metrics

    return train_step


def _inference_variables(state: TrainState) -> dict[str, Any]:
    """The model's variables for a forward pass without updates: all parameters and MoE biases."""
    variables = {"params": optim.merge_params(state.params, state.memory)}
    if state.moe_bias:
        variables[MOE_BIAS] = state.moe_bias
    return variables


def make_eval_step(model: Transformer) -> Callable[[TrainState, dict[str, jax.Array]], dict]:
    """Summed negative log-likelihood, token count and target bytes of one batch."""

    def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        variables = _inference_variables(state)
        logits, _ = model.apply(
            variables,
            batch["inputs"],
            batch["positions"],
            batch["segment_ids"],
            batch.get("hash_ids"),
        )
        loss, count = cross_entropy_loss(logits, batch["targets"], batch["loss_mask"])
        target_bytes = jnp.sum(batch["target_bytes"] * batch["loss_mask"])
        return {"nll_sum": loss * count, "tokens": count, "bytes": target_bytes}

    return eval_step


def make_mixing_diagnostics(
    cfg: config_lib.Config, lookup_fn: Callable | None
) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]] | None:
    """mHC/HC diagnostics on one batch (docs/design.md §2.6): composite Amax gains from the bottom
    site to the top, the worst row/column-sum error of the mixing matrices and (mHC, mHC-lite) the
    largest spread of their logits; None for a plain residual model (no mixing)."""
    if cfg.model.hc.kind == "residual" or cfg.model.hc.n_streams == 1:
        return None
    model = Transformer(cfg.model, lookup_fn=lookup_fn, sow_mixing=True)

    def diagnostics(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        variables = _inference_variables(state)
        _, inter = model.apply(
            variables,
            batch["inputs"],
            batch["positions"],
            batch["segment_ids"],
            batch.get("hash_ids"),
            mutable=["intermediates"],
        )
        h_res_SXGG = mixing_matrices(cfg.model, inter["intermediates"])
        gains = amax_gain(h_res_SXGG)
        logits = None
        if cfg.model.hc.kind in ("mhc", "mhc_lite"):
            # Pre-Sinkhorn (mHC-lite: permutation) logits, [2L, X, G, G] or [2L, X, n!].
            logits = mixing_matrices(cfg.model, inter["intermediates"], field="res_logits")
        stats = mixing_stats(h_res_SXGG, logits)
        extra = {} if logits is None else {"hc_res_logit_spread": jnp.max(stats["logit_spread"])}
        return {
            **extra,
            "hc_composite_forward_gain": gains["composite_forward"][0],
            "hc_composite_backward_gain": gains["composite_backward"][0],
            "hc_max_composite_forward_gain": jnp.max(gains["composite_forward"]),
            "hc_max_composite_backward_gain": jnp.max(gains["composite_backward"]),
            "hc_row_sum_err": jnp.max(stats["row_sum_err"]),
            "hc_col_sum_err": jnp.max(stats["col_sum_err"]),
            "hc_mixing_entropy": jnp.mean(stats["entropy"]),
        }

    return diagnostics


def evaluate(
    eval_step: Callable, state: TrainState, batches: Iterator[dict[str, jax.Array]]
) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte over the given batches."""
    totals = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in batches:
        out = jax.device_get(eval_step(state, batch))
        for key in totals:
            totals[key] += float(out[key])
    if totals["tokens"] == 0:
        raise ValueError("evaluation saw no tokens: the validation split is empty")
    loss = totals["nll_sum"] / totals["tokens"]
    bits_per_byte = totals["nll_sum"] / max(totals["bytes"], 1.0) / math.log(2)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 50.0)),
        "eval_bits_per_byte": bits_per_byte,
    }


# ------------------------------------------------------------------------------------------------
# The program.
# ------------------------------------------------------------------------------------------------


def _checkpoint_metadata(
    config: ml_collections.ConfigDict, setup: DataSetup, data_shards: int | None = None
) -> dict[str, Any]:
    full = config_lib.to_dict(config)
    # The pad id as resolved (-1 names the tokenizer's), so a resume compares ids, not spellings.
    full["model"]["pad_id"] = setup.spec.pad_id
    # What decides the order and content of the batches: a saved iterator position means the same
    # thing only under the same values.
    data = {
        "seed": full["seed"],
        "batch_size": full["batch_size"],
        "seq_len": full["seq_len"],
        "data_shards": data_shards or jax.process_count(),
        "corpus_fingerprint": setup.corpus.fingerprint,
        "eval_fraction": full["eval_fraction"],
        "eval_data_path": full["eval_data_path"],
        "data_workers": full["data_workers"],
        "shuffle_window": full["shuffle_window"],
    }
    return {"config": full, "model": full["model"], "data": data, **setup.metadata()}


def checkpoint_items(state: TrainState) -> tuple[dict[str, Any], dict[str, Any]]:
    """The "state" item (dense parameters, optimizer state, step, MoE biases) and the "memory"
    item (Engram tables and their optimizer state) of a TrainState, or of its sharding tree."""
    dense = {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "moe_bias": state.moe_bias,
    }
    return dense, {"tables": state.memory, "opt_state": state.memory_opt_state}


def _newest_readable_metadata(store: checkpoint_lib.CheckpointStore) -> dict | None:
    """The metadata of the newest step whose `meta` item reads (None without checkpoints)."""
    for step in reversed(store.all_steps()):
        try:
            return store.read_metadata(step)
        except checkpoint_lib.CheckpointReadError as e:
            logger.warning("checkpoint step %d: metadata unreadable (%s)", step, e)
    return None


def _restore_or_init(
    store: checkpoint_lib.CheckpointStore,
    current: dict[str, Any],
    state: TrainState,
    shardings: Any,
    host: host_tables.HostPlacement | None = None,
) -> tuple[TrainState, dict | None]:
    """Restores the newest step that restores (an unreadable newer one is set aside with a
    warning, never deleted), or returns `state` untouched when there is no checkpoint.
    `current` is this run's checkpoint metadata (`_checkpoint_metadata`)."""
    steps = store.all_steps()
    failures: list[str] = []
    for step in reversed(steps):
        try:
            result = _restore_step(store, step, current, state, shardings, host)
        except checkpoint_lib.CheckpointReadError as e:
            logger.warning(
                "checkpoint step %d cannot be restored, skipping it (it is kept, moved out of "
                "the checkpoint directory) and trying the next older step: %s",
                step,
                e,
            )
            failures.append(f"step {step}: {e}")
            continue
        _agree_on_restored_step(step)
        for skipped in steps[len(steps) - len(failures) :]:
            where = store.set_aside(skipped)
            logger.warning("unreadable checkpoint step %d moved to %s", skipped, where)
        store.enforce_max_to_keep()
        return result
    if failures:
        raise checkpoint_lib.CheckpointReadError(
            f"no checkpoint in {store.directory} restores:\n  " + "\n  ".join(failures)
        )
    _agree_on_restored_step(0)
    return state, None


def _agree_on_restored_step(step: int) -> None:
    """Every process must resume from the same step (they read the same files, so a
    disagreement means a storage fault); raises naming the steps otherwise."""
    if jax.process_count() == 1:
        return
    steps = np.asarray(multihost_utils.process_allgather(np.int64(step))).reshape(-1)
    if len(set(steps.tolist())) > 1:
        raise checkpoint_lib.CheckpointReadError(
            f"processes restored different checkpoint steps {steps.tolist()} (process i at index "
            "i): some checkpoint files read differently on different hosts"
        )


def _restore_step(
    store: checkpoint_lib.CheckpointStore,
    step: int,
    current: dict[str, Any],
    state: TrainState,
    shardings: Any,
    host: host_tables.HostPlacement | None = None,
) -> tuple[TrainState, dict | None]:
    saved = _with_resolved_pad(store.read_metadata(step), current["model"]["pad_id"])
    changed = checkpoint_lib.check_compatible(
        saved, current, keys_must_match=_MUST_MATCH, may_differ=COMPUTE_ONLY_KEYS
    )
    _check_table_training(saved, current["config"])
    if changed:
        logger.warning(
            "checkpoint step %d: resuming with changed compute settings (parameters "
            "unaffected):\n  %s",
            step,
            "\n  ".join(changed),
        )

    def abstract(tree, tree_shardings):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, tree_shardings
        )

    dense, memory = checkpoint_items(state)
    dense_shardings, memory_shardings = checkpoint_items(shardings)
    current_data = current["data"]
    saved_data = _saved_data_settings(saved)
    same_data = saved_data == current_data
    if not same_data:
        # New data, batch shape, seed or shard count: the saved iterator position would mean
        # other batches, so the model resumes and the data stream starts afresh.
        logger.warning(
            "checkpoint step %d: data settings differ (saved %s, now %s); restoring the model "
            "and starting the data stream from the beginning",
            step,
            saved_data,
            current_data,
        )
    restored = store.restore(
        step,
        abstract_state=abstract(dense, dense_shardings),
        abstract_memory=(
            host.abstract_memory_item() if host else abstract(memory, memory_shardings)
        ),
        items=("state", "memory"),
    )
    if same_data:
        restored["data"] = _merge_shard_states(store.restore_all_data(step))
        logger.info(
            "checkpoint step %d: data stream position restored (shards %s)",
            step,
            ", ".join(sorted(restored["data"]["shards"], key=int)),
        )
    d, m = restored["state"], restored.get("memory") or {"tables": {}, "opt_state": ()}
    if host is not None:
        # Host tables: the memory item fills host RAM; the device state keeps no tables.
        host.tables.load_memory_item(m)
        m = {"tables": state.memory, "opt_state": state.memory_opt_state}
    logger.info("restored checkpoint step %d from %s", step, store.directory)
    new_state = TrainState(
        step=d["step"],
        params=d["params"],
        memory=m["tables"],
        opt_state=d["opt_state"],
        memory_opt_state=m["opt_state"] if m["tables"] else state.memory_opt_state,
        moe_bias=d["moe_bias"],
    )
    return new_state, restored.get("data")


def _with_resolved_pad(saved: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """Checkpoint metadata with a `model.pad_id` of -1 ("the tokenizer's", as checkpoints of one
    earlier version wrote it) replaced by `pad_id`, the id it resolves to with this run's
    tokenizer (whose fingerprint must equal the checkpoint's)."""
    model = saved.get("model")
    if not isinstance(model, dict) or model.get("pad_id") != -1:
        return saved
    return {**saved, "model": {**model, "pad_id": pad_id}}


def _table_training(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide the structure of the tables' optimizer state in a checkpoint
    (none without Engram); a checkpoint written before `table_update` existed was trained with
    whole-table optax Adam (`config_lib.LEGACY_VALUES`)."""
    model = config.get("model", {})
    token_tables = any(model.get(k, {}).get("enabled") for k in ("overencoding", "ple"))
    hidden_addressed = bool(model.get("ultramem", {}).get("layer_ids"))
    if not model.get("engram", {}).get("layer_ids") and not token_tables and not hidden_addressed:
        return {}  # no Engram, OverEncoding, PLE or UltraMem table: no tables
    update = config.get("table_update", config_lib.LEGACY_VALUES["table_update"])
    settings = {"table_update": update}
    if update == "sparse":
        settings["table_optimizer"] = config.get("table_optimizer")
    return settings


def _check_table_training(saved: dict[str, Any], config: Mapping[str, Any]) -> None:
    """Refuses a resume that changes how the tables are optimized: the checkpoint's optimizer
    state for them would not fit (raises naming each key and the override that resumes)."""
    before = _table_training(saved.get("config", {}))
    now = _table_training(config)
    changed = [key for key in before if before.get(key) != now.get(key)]
    if changed:
        raise checkpoint_lib.CheckpointMismatchError(
            "checkpoint is incompatible with the current config: the Engram tables' optimizer "
            "state was written for "
            + ", ".join(f"{key}={before[key]!r} (config {now.get(key)!r})" for key in changed)
            + "; resume with "
            + " ".join(f"--config.{key}={before[key]}" for key in changed)
        )


def _saved_data_settings(saved: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's data settings; those written before logical data shards existed name
    the process count, which was then the shard count."""
    data = saved.get("data")
    if isinstance(data, dict) and "process_count" in data and "data_shards" not in data:
        data = {**data, "data_shards": data["process_count"]}
        del data["process_count"]
    return data


def _merge_shard_states(per_process: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One `ShardedBatches` state from every saving process's; a plain iterator state (written
    before logical shards) is the shard of its process's index."""
    shards = {}
    for process, state in per_process.items():
        shards.update(state["shards"] if "shards" in state else {str(process): state})
    return {"shards": shards}


def data_shards_to_resume(saved: dict[str, Any] | None, cfg: config_lib.Config) -> int:
    """The run's logical data-shard count: the checkpoint's when this process count can split it
    (and the batch size still divides it), else this run's process count."""
    count = jax.process_count()
    shards = (_saved_data_settings(saved) or {}).get("data_shards") if saved else None
    if not isinstance(shards, int) or shards == count:
        return count
    if shards % count == 0 and cfg.train.batch_size % shards == 0:
        logger.info(
            "resuming a data stream of %d shards on %d processes (%d shards each)",
            shards,
            count,
            shards // count,
        )
        return shards
    logger.warning(
        "the checkpoint's data stream has %d shards, which %d processes cannot split evenly (or "
        "batch_size %d does not divide); the data stream starts afresh",
        shards,
        count,
        cfg.train.batch_size,
    )
    return count


def _save(store, state: TrainState, data_iter, metadata: dict[str, Any], host=None) -> None:
    step = int(jax.device_get(state.step))
    dense, memory = checkpoint_items(state)
    if host is not None:
        memory = host.memory_item()
    store.save(
        step,
        state=dense,
        memory=memory,
        data_state=data_iter.get_state(),
        metadata=metadata,
    )


def _host_metrics(step: int, device_metrics: dict[str, jax.Array]) -> dict[str, float]:
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    # A finite loss with non-finite gradients still leaves NaN parameters behind it.
    for key in ("train_loss", "grad_norm", "memory_grad_norm"):
        if not math.isfinite(metrics[key]):
            raise FloatingPointError(
                f"{key} is {metrics[key]} at step {step}; stopping before any checkpoint of "
                "this state is written"
            )
    return metrics


def _prepare_workdir(workdir: str) -> None:
    """Creates the workdir and proves it writable, so a bad path fails before any work."""
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"workdir: {workdir!r} is a file; expected a directory (or a path to create)"
        )
    probe = path / f".write_test_{socket.gethostname()}_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"workdir: cannot write to {workdir!r} ({type(e).__name__}: {e}); expected a "
            "writable directory"
        ) from e


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    step_hook: Callable[[int, TrainState], None] | None = None,
) -> dict[str, float]:
    """Trains (resuming from the workdir's latest checkpoint when there is one) and evaluates.

    Args:
      config: a config from `base_config()` (validated here).
      workdir: checkpoints, metrics, TensorBoard events and the tokenizer go here.
      step_hook: called as `step_hook(step, state)` after every step (and its checkpoint save,
        if any), e.g. for custom logging or fault-injection tests.

    Returns:
      The last step's training metrics merged with the last evaluation.

    Raises:
      preemption.TrainingStopped: SIGTERM or SIGINT (on any process) stopped training at a step
        boundary; that step was saved and the metrics flushed first. A second signal exits the
        process at once.
    """
    cfg = config_lib.validate(config)
    t = cfg.train
    if t.batch_size % jax.process_count():
        raise config_lib.ConfigError(
            f"config.batch_size: got {t.batch_size}; expected a multiple of the process count "
            f"{jax.process_count()}"
        )
    if cfg.mesh.axis_types != "auto":
        # The trainer places arrays by logical-axis rules and leaves the rest to XLA's sharding
        # propagation; Explicit axes would need an out_sharding on every reshape and gather of
        # the MoE dispatch. The Engram lookup itself (sharding.vocab_parallel_lookup) supports
        # Explicit meshes for custom training loops.
        raise config_lib.ConfigError(
            f"config.mesh.axis_types: got {cfg.mesh.axis_types!r}; the training program runs on "
            "'auto' meshes"
        )
    _prepare_workdir(workdir)
    mesh = sharding.mesh_from_config(cfg.mesh)
    batch_shards = sharding.batch_shards(mesh)
    if t.batch_size % batch_shards:
        raise config_lib.ConfigError(
            f"config.batch_size: got {t.batch_size}; expected a multiple of data x fsdp = "
            f"{batch_shards} devices"
        )
    row_shards = sharding.table_row_shards(mesh)
    if cfg.model.engram.enabled and cfg.model.engram.table_row_multiple % row_shards:
        raise config_lib.ConfigError(
            f"config.model.engram.table_row_multiple: got {cfg.model.engram.table_row_multiple}; "
            f"expected a multiple of the {row_shards} table-row shards (mesh fsdp x tensor)"
        )
    # One run per workdir: process 0 holds the lock for the whole job.
    lock = run_on_process_zero(lambda: _acquire_lock(workdir), "locking the workdir")
    try:
        return _train_locked(config, cfg, workdir, mesh, step_hook)
    finally:
        if lock is not None:
            lock.release()


def _acquire_lock(workdir: str) -> WorkdirLock:
    lock = WorkdirLock(workdir)
    lock.acquire()
    return lock


def _train_locked(
    config: ml_collections.ConfigDict,
    cfg: config_lib.Config,
    workdir: str,
    mesh: jax.sharding.Mesh,
    step_hook: Callable[[int, TrainState], None] | None,
) -> dict[str, float]:
    t = cfg.train
    store = checkpoint_lib.CheckpointStore(
        storage.join(workdir, "checkpoints"), max_to_keep=t.max_to_keep
    )
    try:
        saved = _newest_readable_metadata(store)

        def check_tokenizer(tokenizer: Any) -> None:
            # A refused resume must leave the workdir as it was: this runs before the tokenizer
            # (or anything else) is written.
            if saved is not None:
                full = config_lib.to_dict(config)
                model = full["model"]
                model["pad_id"] = data_lib.resolve_pad_id(
                    tokenizer, cfg.model.pad_id, cfg.train.eos_token
                )
                current = {
                    "model": model,
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                }
                checkpoint_lib.check_compatible(
                    _with_resolved_pad(saved, model["pad_id"]),
                    current,
                    keys_must_match=_TOKENIZER_MUST_MATCH,
                    may_differ=COMPUTE_ONLY_KEYS,
                )
                _check_table_training(saved, full)

        setup = build_data(
            cfg,
            workdir,
            check_tokenizer=check_tokenizer,
            checkpoint_tokenizer=saved.get("tokenizer_fingerprint") if saved else None,
        )
        batch_shards = sharding.batch_shards(mesh)
        setup.memory_shards = max(1, batch_shards // jax.process_count())
        if cfg.train.eval_batches:
            # Fails now, not at the first evaluation, when this process's shard holds no
            # held-out document (the stream names the data and the process).
            next(iter(document_stream(setup, cfg, train=False)))
        model = Transformer(cfg.model, lookup_fn=sharding.table_lookup_fn(mesh))
        accounting = account(cfg.model, t.seq_len)
        logger.info("model:\n%s", format_accounting(accounting))

        dense_tx, memory_tx, schedule = make_optimizers(cfg)
        on_host = t.table_placement == "host" and cfg.model.engram.enabled
        if on_host and jax.process_count() > 1:
            raise config_lib.ConfigError(
                f"config.table_placement: got 'host' with {jax.process_count()} processes; "
                "host tables are single-process (use table_placement='device' on multi-host runs)"
            )
        state, shardings = create_train_state(
            model,
            cfg,
            (dense_tx, memory_tx),
            mesh,
            table_placement="host" if on_host else "device",
        )
        host = None
        if on_host:
            host = host_tables.HostPlacement(
                model, cfg, state, shardings, dense_tx, memory_tx, schedule, mesh
            )
            state, shardings = host.state, host.shardings
        data_shards = data_shards_to_resume(saved, cfg)
        metadata = _checkpoint_metadata(config, setup, data_shards)
        state, data_state = _restore_or_init(store, metadata, state, shardings, host)
        train_iter = make_batches(setup, cfg, train=True, data_shards=data_shards)
        if host is not None:
            train_iter = host.wrap_iterator(train_iter)
        if data_state is not None:
            train_iter.set_state(data_state)
    except BaseException:
        store.close()
        raise

    batch_sharding = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        train_step = jax.jit(
            make_train_step(model, (dense_tx, memory_tx), schedule),
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        eval_step = jax.jit(make_eval_step(model), in_shardings=(shardings, batch_sharding))
        diagnostics = make_mixing_diagnostics(cfg, model.lookup_fn)
        if diagnostics is not None:
            diagnostics = jax.jit(diagnostics, in_shardings=(shardings, batch_sharding))
        if host is not None:
            # Host tables: steps and evals read rows from host RAM (host_tables.HostPlacement);
            # the mHC diagnostics need tables on the device and are skipped.
            train_step, eval_step, diagnostics = host.train_step, host.eval_step, None
        program = _Program(
            cfg=cfg,
            mesh=mesh,
            setup=setup,
            train_step=train_step,
            eval_step=eval_step,
            diagnostics=diagnostics,
            store=store,
            metadata=metadata,
            flops_per_token=accounting.flops_per_token,
            workdir=workdir,
            step_hook=step_hook,
            host=host,
        )
        return _loop(program, state, train_iter)


@dataclasses.dataclass(frozen=True)
class _Program:
    """The compiled steps and the services the training loop drives."""

    cfg: config_lib.Config
    mesh: jax.sharding.Mesh
    setup: DataSetup
    train_step: Callable
    eval_step: Callable
    diagnostics: Callable | None
    store: checkpoint_lib.CheckpointStore
    metadata: dict[str, Any]
    flops_per_token: float
    workdir: str
    step_hook: Callable[[int, TrainState], None] | None
    host: host_tables.HostPlacement | None = None


def _loop(program: _Program, state: TrainState, train_iter) -> dict[str, float]:
    """Steps until `num_train_steps`, evaluating, logging and checkpointing on schedule."""
    cfg, mesh, store = program.cfg, program.mesh, program.store
    t = cfg.train
    step = int(jax.device_get(state.step))
    tokens_per_step = t.batch_size * t.seq_len
    peak_flops = metrics_lib.peak_flops_per_second() * jax.device_count()
    # Rows past the restored step were written by a killed run; this run writes them again.
    writer = metrics_lib.MetricsWriter(program.workdir, resume_step=step)
    progress = metrics_lib.Progress(
        t.num_train_steps, initial_step=step, log_every=t.log_every, tokens_per_step=tokens_per_step
    )
    plots = plot_lib.PlotRefresher(program.workdir, enabled=writer.enabled)
    profiler = profiling.StepProfiler(program.workdir, t.profile_steps, jax.process_index())
    pending: tuple[int, dict[str, jax.Array]] | None = None
    last: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0

    def flush_pending() -> None:
        nonlocal pending, last, window_start, window_steps
        if pending is None:
            return
        pending_step, device_metrics = pending
        pending = None
        metrics = _host_metrics(pending_step, device_metrics)
        window_steps += 1
        if pending_step % t.log_every == 0 or pending_step == t.num_train_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_second = window_steps * tokens_per_step / max(elapsed, 1e-9)
            metrics["tokens_per_second"] = tokens_per_second
            metrics["mfu"] = tokens_per_second * program.flops_per_token / peak_flops
            window_start, window_steps = time.perf_counter(), 0
            writer.write(pending_step, metrics)
        progress.update(pending_step, metrics)
        last.update(metrics)

    def run_eval() -> None:
        eval_iter = make_batches(program.setup, cfg, train=False)
        batches = [sharding.global_batch(next(eval_iter), mesh) for _ in range(t.eval_batches)]
        eval_metrics = evaluate(program.eval_step, state, iter(batches))
        if program.diagnostics is not None:
            diagnostics = jax.device_get(program.diagnostics(state, batches[0]))
            eval_metrics.update({k: float(v) for k, v in diagnostics.items()})
        writer.write(step, eval_metrics)
        progress.log_eval(step, eval_metrics)
        last.update(eval_metrics)
        writer.flush()  # the plots read metrics.jsonl
        plots.refresh()

    def close_all() -> None:
        # Every closer runs even if an earlier one raises (waiting for the last checkpoint
        # first); the first error is re-raised after all have run.
        with contextlib.ExitStack() as closers:
            if program.host is not None:
                closers.callback(program.host.trainer.close)
            closers.callback(progress.close)
            closers.callback(plots.close)  # runs after writer.close (LIFO): every row is on disk
            closers.callback(writer.close)
            closers.callback(store.close)
            closers.callback(store.wait_until_finished)
            closers.callback(profiler.close)

    stop = preemption.StopSignals(
        mesh, t.batch_size // jax.process_count(), sharding.BATCH_AXES
    ).install()
    try:
        while step < t.num_train_steps:
            batch = sharding.global_batch(next(train_iter), mesh)
            profiler.before_step(step + 1)
            state, device_metrics = program.train_step(state, batch)
            profiler.after_step(step + 1, (state, device_metrics))
            if pending is None and window_steps == 0:
                # The first call compiled the step; throughput counts from here.
                window_start = time.perf_counter()
            step += 1
            # Fetch the previous step's metrics only now, so the device never waits for the host.
            flush_pending()
            pending = (step, device_metrics)
            save_now = step == t.num_train_steps or (
                t.checkpoint_every and step % t.checkpoint_every == 0
            )
            eval_now = step == t.num_train_steps or (t.eval_every and step % t.eval_every == 0)
            if save_now or eval_now:
                flush_pending()
            if eval_now and t.eval_batches:
                run_eval()
            if save_now:
                _save(store, state, train_iter, program.metadata, program.host)
            if save_now or eval_now:
                # Evaluation and checkpoint time are not training throughput.
                window_start, window_steps = time.perf_counter(), 0
            if program.step_hook is not None:
                program.step_hook(step, state)
            if stop.should_stop(step):
                if not save_now:
                    flush_pending()
                    _save(store, state, train_iter, program.metadata, program.host)
                break
        flush_pending()
    except BaseException:
        # The loop's own error is the one to report; a failure while closing is only logged.
        try:
            close_all()
        except Exception:
            logger.exception("error while closing after a failed training loop")
        finally:
            stop.uninstall()
        raise
    try:
        close_all()
    finally:
        stop.uninstall()
    if stop.agreed:
        raise preemption.TrainingStopped(
            stop.agreed, step, str(store.directory / str(step)), local=stop.local
        )
    return last


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    flags_values = flags.FLAGS
    config = flags_values.config
    config_lib.validate(config)
    multi = flags_values.num_processes > 1
    if flags_values.distributed or multi or config.mesh.coordinator_address:
        # With no address or counts, jax detects them itself (Cloud TPU pods, SLURM).
        jax.distributed.initialize(
            coordinator_address=config.mesh.coordinator_address or None,
            num_processes=flags_values.num_processes if multi else None,
            process_id=flags_values.process_id if multi else None,
            initialization_timeout=config.mesh.initialization_timeout,
        )
    # Orbax and absl log every checkpoint internal at INFO; keep the console to our own lines.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        train_and_evaluate(config, flags_values.workdir)
    except preemption.TrainingStopped as stopped:
        logger.warning("%s", stopped)
        sys.exit(stopped.exit_code)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file, or the name of a shipped config (tiny).", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize() even without a coordinator address or process count, "
        "letting jax detect them (Cloud TPU pods, SLURM); launch/tpu_pod.sh sets it.",
    )
    flags.DEFINE_integer("num_processes", 1, "Processes of a multi-process run (1: single).")
    flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    import sys

    from absl import app

    from engram_jax.configs import resolve_argv

    _define_flags()
    app.run(main, argv=resolve_argv(sys.argv))  # --config=tiny: a shipped config by name
