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
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import config as config_lib
from engram_jax import data as data_lib
from engram_jax import host_tables, optim, sharding, sparse_optim, sparse_tables
from engram_jax import metrics as metrics_lib
from engram_jax.accounting import account, format_accounting
from engram_jax.hashing import tokenizer_fingerprint
from engram_jax.mhc import amax_gain, mixing_stats
from engram_jax.model import MOE_BIAS, Transformer, cross_entropy_loss, mixing_matrices

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
# Checkpoint metadata entries that must match for a restore to mean the same thing.
_MUST_MATCH = ("model", "tokenizer_fingerprint", "compressed_tokenizer_fingerprint", "hasher")


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
    train_documents: list[str]
    eval_documents: list[str]
    # Batch groups per process whose table rows are deduplicated apart (the data-parallel shards).
    memory_shards: int = 1

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
        tokenizer, pad_id=cfg.model.pad_id, vocab_size=cfg.model.vocab_size
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


def build_data(cfg: config_lib.Config, workdir: str) -> DataSetup:
    """Loads the corpus, the tokenizer (trained and cached in the workdir when none is given) and
    the Engram hashing of the configured layers."""
    documents = data_lib.load_documents(cfg.train.data_path)
    train_docs, eval_docs = data_lib.split_documents(documents, cfg.train.eval_fraction)
    cache_dir = os.path.join(workdir, "tokenizer")
    tokenizer = data_lib.load_or_train_tokenizer(
        cfg.train.tokenizer_path, train_docs, cfg.model.vocab_size, cache_dir=cache_dir
    )
    spec, engram = token_specs(cfg, tokenizer, cache_dir=cache_dir)
    return DataSetup(tokenizer, spec, engram, train_docs, eval_docs)


def make_batches(
    setup: DataSetup, cfg: config_lib.Config, *, train: bool
) -> data_lib.grain.DatasetIterator:
    """This process's share of the training stream (endless, shuffled) or the eval stream."""
    per_process = cfg.train.batch_size // jax.process_count()
    return data_lib.make_pipeline(
        setup.train_documents if train else setup.eval_documents,
        setup.tokenizer,
        setup.spec,
        seq_len=cfg.train.seq_len,
        batch_size=per_process,
        seed=cfg.train.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        shuffle=train,
        add_eos=setup.spec.eos_id is not None,
        engram=setup.engram,
        memory_shards=setup.memory_shards,
    )


def make_optimizers(cfg: config_lib.Config) -> tuple[optax.GradientTransformation, ...]:
    """Dense AdamW and the Engram tables' optimizer (ALGORITHMS.md 1.11): a row-wise
    `sparse_optim.RowOptimizer` with `table_update="sparse"`, else whole-table optax Adam."""
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
    if t.table_update == "sparse":
        return dense, sparse_optim.from_config(cfg, schedule), schedule
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
) -> tuple[TrainState, Any]:
    """Initialises the state directly into its shardings (abstract shapes first, nothing
    full-size on one device) and returns it with the state's sharding tree."""

    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]

    def init(rng: jax.Array) -> TrainState:
        return init_train_state(model, cfg, txs, rng, batch_size=batch_shards)

    rng = jax.random.PRNGKey(cfg.train.seed)
    shardings = sharding.tree_shardings(jax.eval_shape(init, rng), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        state = jax.jit(lambda key: nn.meta.unbox(init(key)), out_shardings=shardings)(rng)
    return state, shardings


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
    if isinstance(memory_tx, sparse_optim.RowOptimizer):
        return sparse_tables.make_sparse_train_step(model, dense_tx, memory_tx, schedule)

    def loss_fn(params, memory, moe_bias, batch):
        variables = {"params": optim.merge_params(params, memory), MOE_BIAS: moe_bias}
        (logits, aux), updated = model.apply(
            variables,
            batch["inputs"],
            batch["positions"],
            batch["segment_ids"],
            batch.get("hash_ids"),
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
    """mHC/HC diagnostics on one batch (ALGORITHMS.md 2.6): composite Amax gains from the bottom
    site to the top and the worst row/column-sum error of the mixing matrices; None for a plain
    residual model (no mixing)."""
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
        stats = mixing_stats(h_res_SXGG)
        return {
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


def _checkpoint_metadata(config: ml_collections.ConfigDict, setup: DataSetup) -> dict[str, Any]:
    full = config_lib.to_dict(config)
    documents = hashlib.sha256()
    for document in setup.train_documents:
        documents.update(hashlib.sha256(document.encode("utf-8")).digest())
    # What decides the order and content of the batches: a saved iterator position means the same
    # thing only under the same values.
    data = {
        "seed": full["seed"],
        "batch_size": full["batch_size"],
        "seq_len": full["seq_len"],
        "process_count": jax.process_count(),
        "train_documents_sha256": documents.hexdigest(),
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


def _restore_or_init(
    store: checkpoint_lib.CheckpointStore,
    config: ml_collections.ConfigDict,
    setup: DataSetup,
    state: TrainState,
    shardings: Any,
    host: host_tables.HostPlacement | None = None,
) -> tuple[TrainState, dict | None]:
    step = store.latest_step()
    if step is None:
        return state, None
    saved = store.read_metadata(step)
    checkpoint_lib.check_compatible(
        saved, _checkpoint_metadata(config, setup), keys_must_match=_MUST_MATCH
    )

    def abstract(tree, tree_shardings):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, tree_shardings
        )

    dense, memory = checkpoint_items(state)
    dense_shardings, memory_shardings = checkpoint_items(shardings)
    items = ("state", "memory", "data")
    current_data = _checkpoint_metadata(config, setup)["data"]
    if saved.get("data") != current_data:
        # New data, batch shape, seed or process count: the saved iterator position would mean
        # other batches, so the model resumes and the data stream starts afresh.
        logger.warning(
            "checkpoint step %d: data settings differ (saved %s, now %s); restoring the model "
            "and starting the data stream from the beginning",
            step,
            saved.get("data"),
            current_data,
        )
        items = ("state", "memory")
    restored = store.restore(
        step,
        abstract_state=abstract(dense, dense_shardings),
        abstract_memory=(
            host.abstract_memory_item() if host else abstract(memory, memory_shardings)
        ),
        items=items,
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
    if "://" in workdir:
        raise ValueError(
            f"workdir: got {workdir!r}; expected a filesystem path (metrics, TensorBoard events "
            "and the tokenizer are written with POSIX file I/O): mount the bucket on every host, "
            "e.g. with gcsfuse, and pass the mount path"
        )
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.mesh_from_config(cfg.mesh)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
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
    setup = build_data(cfg, workdir)
    setup.memory_shards = batch_shards // jax.process_count()
    if cfg.train.eval_batches and len(setup.eval_documents) < jax.process_count():
        raise config_lib.ConfigError(
            f"config.eval_fraction: got {cfg.train.eval_fraction}, which holds out "
            f"{len(setup.eval_documents)} documents; every one of the {jax.process_count()} "
            "processes needs at least one (raise eval_fraction or use a larger corpus)"
        )
    if jax.process_index() == 0:
        # What `engram_jax.generate` loads; the checkpoint's fingerprint guards it.
        setup.tokenizer.save(os.path.join(workdir, TOKENIZER_FILE))
    model = Transformer(cfg.model, lookup_fn=sharding.table_lookup_fn(mesh))
    accounting = account(cfg.model, t.seq_len)
    logger.info("model:\n%s", format_accounting(accounting))

    dense_tx, memory_tx, schedule = make_optimizers(cfg)
    state, shardings = create_train_state(model, cfg, (dense_tx, memory_tx), mesh)
    host = None
    if t.table_placement == "host" and cfg.model.engram.enabled:
        if jax.process_count() > 1:
            raise config_lib.ConfigError(
                f"config.table_placement: got 'host' with {jax.process_count()} processes; host "
                "tables are single-process (use table_placement='device' on multi-host runs)"
            )
        host = host_tables.HostPlacement(
            model, cfg, state, shardings, dense_tx, memory_tx, schedule, mesh
        )
        state, shardings = host.state, host.shardings
    store = checkpoint_lib.CheckpointStore(
        os.path.join(workdir, "checkpoints"), max_to_keep=t.max_to_keep
    )
    metadata = _checkpoint_metadata(config, setup)
    state, data_state = _restore_or_init(store, config, setup, state, shardings, host)

    train_iter = make_batches(setup, cfg, train=True)
    if host is not None:
        train_iter = host.wrap_iterator(train_iter)
    if data_state is not None:
        train_iter.set_state(data_state)

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
    writer = metrics_lib.MetricsWriter(program.workdir)
    progress = metrics_lib.Progress(
        t.num_train_steps, initial_step=step, log_every=t.log_every, tokens_per_step=tokens_per_step
    )
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
        logger.info("step %d: %s", step, eval_metrics)
        last.update(eval_metrics)

    def close_all() -> None:
        # Every closer runs even if an earlier one raises (waiting for the last checkpoint
        # first); the first error is re-raised after all have run.
        with contextlib.ExitStack() as closers:
            if program.host is not None:
                closers.callback(program.host.trainer.close)
            closers.callback(progress.close)
            closers.callback(writer.close)
            closers.callback(store.close)
            closers.callback(store.wait_until_finished)

    try:
        while step < t.num_train_steps:
            batch = sharding.global_batch(next(train_iter), mesh)
            state, device_metrics = program.train_step(state, batch)
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
        flush_pending()
    except BaseException:
        # The loop's own error is the one to report; a failure while closing is only logged.
        try:
            close_all()
        except Exception:
            logger.exception("error while closing after a failed training loop")
        raise
    close_all()
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
    train_and_evaluate(config, flags_values.workdir)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/<name>.py).", lock_config=True
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
    from absl import app

    _define_flags()
    app.run(main)
