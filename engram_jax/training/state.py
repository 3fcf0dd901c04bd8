"""The training state and its optimizers: `TrainState`, dense AdamW plus the tables' optimizer,
and the state initialised directly into its shardings (tables built block by block, on the device
or in host RAM).
"""

from __future__ import annotations

import logging
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from engram_jax import config as config_lib
from engram_jax import (
    optim,
    sharding,
)
from engram_jax.model import MOE_BIAS, Transformer
from engram_jax.tables import device_step, initializers, row_optim

logger = logging.getLogger(__name__)


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
