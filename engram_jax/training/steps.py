"""The compiled work of one step: the training step (dense and whole-table, or sparse-table), the
evaluation sums, the mHC/HC mixing diagnostics and the evaluation over a set of batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax

from engram_jax import config as config_lib
from engram_jax import (
    matformer,
    objective,
    optim,
)
from engram_jax.mhc import amax_gain, mixing_stats
from engram_jax.model import MOE_BIAS, Transformer, mixing_matrices
from engram_jax.tables import device_step, row_optim
from engram_jax.training.state import TrainState

logger = logging.getLogger(__name__)


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
        return objective.training_loss(model, variables, batch)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        step_loss = matformer.per_step_loss(loss_fn, model.config, state.step)
        grad_fn = jax.value_and_grad(step_loss, argnums=(0, 1), has_aux=True)
        (_, (loss, aux, moe_bias)), (dense_grads, memory_grads) = grad_fn(
            state.params, state.memory, state.moe_bias, batch
        )
        updates, opt_state = dense_tx.update(dense_grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        memory_updates, memory_opt_state = memory_tx.update(
            memory_grads, state.memory_opt_state, state.memory
        )
        memory = optax.apply_updates(state.memory, memory_updates)
        metrics = objective.step_metrics(loss, aux, dense_grads, schedule(state.step))
        metrics["memory_grad_norm"] = optax.tree.norm(memory_grads)
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


def inference_variables(state: TrainState) -> dict[str, Any]:
    """The model's variables for a forward pass without updates: all parameters (host tables: the
    dense ones only, the rows come gathered) and MoE biases."""
    variables = {"params": optim.merge_params(state.params, state.memory)}
    if state.moe_bias:
        variables[MOE_BIAS] = state.moe_bias
    return variables


def make_eval_step(model: Transformer) -> Callable[..., dict]:
    """`eval_step(state, batch, rows=None)`: summed negative log-likelihood, token count and
    target bytes of one batch; with host tables the batch's gathered rows
    (`device_step.make_row_grad_step`'s `rows`)."""

    def eval_step(
        state: TrainState, batch: dict[str, jax.Array], rows: dict[str, jax.Array] | None = None
    ) -> dict[str, jax.Array]:
        variables = inference_variables(state)
        return objective.eval_sums(
            model, variables, batch, *device_step.host_rows_for_model(batch, rows)
        )

    return eval_step


def make_mixing_diagnostics(
    cfg: config_lib.Config, lookup_fn: Callable | None
) -> Callable[..., dict[str, jax.Array]] | None:
    """`diagnostics(state, batch, rows=None)`: the mHC/HC diagnostics on one batch
    (docs/design.md §2.6), with host tables on its gathered rows. Composite Amax gains from the
    bottom site to the top, the worst row/column-sum error of the mixing matrices and (mHC,
    mHC-lite) the largest spread of their logits; None for a plain residual model (no mixing)."""
    if cfg.model.hc.kind == "residual" or cfg.model.hc.n_streams == 1:
        return None
    model = Transformer(cfg.model, lookup_fn=lookup_fn, sow_mixing=True)

    def diagnostics(
        state: TrainState, batch: dict[str, jax.Array], rows: dict[str, jax.Array] | None = None
    ) -> dict[str, jax.Array]:
        variables = inference_variables(state)
        inter = objective.mixing_intermediates(
            model, variables, batch, *device_step.host_rows_for_model(batch, rows)
        )
        h_res_SXGG = mixing_matrices(cfg.model, inter)
        gains = amax_gain(h_res_SXGG)
        logits = None
        if cfg.model.hc.kind in ("mhc", "mhc_lite"):
            # Pre-Sinkhorn (mHC-lite: permutation) logits, [2L, X, G, G] or [2L, X, n!].
            logits = mixing_matrices(cfg.model, inter, field="res_logits")
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
