"""The training objective and the evaluation sums on one batch, written once for every step.

Every step variant (dense tables, sparse device tables, host tables, evaluation, the benches) runs
the model through these functions; they differ only in where the Engram rows come from: hash ids
looked up in the tables inside the model, or rows gathered beforehand and passed in as
`engram_rows [B, L_e, T, M, W]` (`tables/device_step.expand_rows`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from engram_jax.model import MOE_BIAS, Transformer, cross_entropy_loss


def _apply(
    model: Transformer,
    variables: dict[str, Any],
    batch: dict[str, jax.Array],
    engram_rows: jax.Array | None,
    **kwargs: Any,
) -> Any:
    """`model.apply` on a batch; the Engram layers read `engram_rows` when given, else they look
    up `batch["hash_ids"]` in the tables of `variables`."""
    return model.apply(
        variables,
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        None if engram_rows is not None else batch.get("hash_ids"),
        engram_rows=engram_rows,
        overencoding_ids=batch.get("overencoding_ids"),
        **kwargs,
    )


def training_loss(
    model: Transformer,
    variables: dict[str, Any],
    batch: dict[str, jax.Array],
    engram_rows: jax.Array | None = None,
    memory_rows: dict[str, Any] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array], Any]]:
    """The loss a step differentiates: mean token cross-entropy plus the MoE balance loss.

    Returns `(total, (cross-entropy, aux, updated MoE biases))`, the form
    `jax.value_and_grad(..., has_aux=True)` takes. The MoE biases update inside `apply`, outside
    the gradient.
    """
    (logits, aux), updated = _apply(
        model,
        variables,
        batch,
        engram_rows,
        memory_rows=memory_rows,
        # Padding stays out of the MoE load, balance loss and bias update.
        token_mask_BT=batch["loss_mask"],
        ffn_granularity=batch.get("ffn_granularity"),  # MatFormer: per_step_loss sets it
        mutable=[MOE_BIAS],
    )
    loss, _ = cross_entropy_loss(logits, batch["targets"], batch["loss_mask"])
    total = loss + aux.get("moe_balance_loss", 0.0)
    return total, (loss, aux, updated.get(MOE_BIAS, {}))


def eval_sums(
    model: Transformer,
    variables: dict[str, Any],
    batch: dict[str, jax.Array],
    engram_rows: jax.Array | None = None,
    memory_rows: dict[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """Summed negative log-likelihood, token count and target bytes of one batch (no updates)."""
    logits, _ = _apply(model, variables, batch, engram_rows, memory_rows=memory_rows)
    loss, count = cross_entropy_loss(logits, batch["targets"], batch["loss_mask"])
    target_bytes = jnp.sum(batch["target_bytes"] * batch["loss_mask"])
    return {"nll_sum": loss * count, "tokens": count, "bytes": target_bytes}


def mixing_intermediates(
    model: Transformer,
    variables: dict[str, Any],
    batch: dict[str, jax.Array],
    engram_rows: jax.Array | None = None,
    memory_rows: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sown intermediates of a forward pass (a model built with `sow_mixing=True`)."""
    _, inter = _apply(
        model, variables, batch, engram_rows, memory_rows=memory_rows, mutable=["intermediates"]
    )
    return inter["intermediates"]


def gate_and_load_metrics(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The Engram gates' mean and spread (overall and per layer) and the MoE load's worst
    violation and balance loss, from the model's aux outputs (empty without Engram or MoE)."""
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


def step_metrics(
    loss: jax.Array, aux: dict[str, jax.Array], dense_grads: Any, learning_rate: jax.Array
) -> dict[str, jax.Array]:
    """The metrics every training step reports (the table gradient's norm is added by the step
    that knows where the table gradients are)."""
    return {
        "train_loss": loss,
        "grad_norm": optax.tree.norm(dense_grads),
        "learning_rate": learning_rate,
        **gate_and_load_metrics(aux),
    }
