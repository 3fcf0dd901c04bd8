"""MatFormer nested FFNs: granularity i of an FFN uses its first m_i hidden units.

docs/design.md "MatFormer". `FFN_i(x) = W_down[:m_i] act(x W_up[:, :m_i])` for the dense SwiGLU and
for every routed and shared expert (`moe.py` slices its kernels with `at_width`). Training picks
the granularity per step (`per_step_loss`); outside training the config's
`matformer.inference_granularity` (one index, or one per layer: Mix'n'Match) slices the same
parameters without retraining, and `matformer_slice` cuts a standalone smaller model
out of them.

How the step picks a width: the granularity is a traced int32 index and each FFN runs
`lax.switch` over one branch per width, each with static slice shapes. Only the taken branch
executes, so a step at granularity i costs the FLOPs of width m_i (a mask over the full hidden
layer would compute all F units every step) and the train step still compiles once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from engram_jax.config import MatformerConfig, ModelConfig

# The granularity sequence of "sample" is a function of the step only (exact resume needs no
# state): uniform draws from this key folded with the step.
_SAMPLE_SEED = 0x6D6174


def at_width(fn: Callable[[int], Any], widths: Sequence[int], granularity: Any) -> Any:
    """`fn(m)` at the selected hidden width.

    Args:
      fn: builds the FFN output for a static width `m`.
      widths: the nested widths m_1 < ... < m_g (empty: MatFormer off, `fn` gets None).
      granularity: None (the full width), a Python int (a static index: one compiled width) or
        a traced int32 scalar (`lax.switch` over all widths; only the taken branch runs).
    """
    if not widths:
        return fn(None)
    if granularity is None:
        return fn(widths[-1])
    if isinstance(granularity, int):
        if not 0 <= granularity < len(widths):
            raise ValueError(
                f"matformer: granularity={granularity}; expected an index in [0, {len(widths)})"
            )
        return fn(widths[granularity])
    branches = [lambda m=m: fn(m) for m in widths]
    return jax.lax.switch(jnp.clip(granularity, 0, len(widths) - 1), branches)


def layer_granularities(config: ModelConfig) -> tuple[int | None, ...]:
    """The inference granularity of each layer (None: the full width, or MatFormer off)."""
    picks = config.matformer.inference_granularity
    if not config.matformer.enabled or not picks:
        return (None,) * config.num_layers
    if len(picks) == 1:
        return tuple(picks) * config.num_layers
    return tuple(picks)


def sample_granularity(config: MatformerConfig, step: jax.Array) -> jax.Array:
    """The training granularity of `step` ("sample": uniform over the granularities)."""
    key = jax.random.fold_in(jax.random.PRNGKey(_SAMPLE_SEED), step)
    return jax.random.randint(key, (), 0, len(config.granularities), jnp.int32)


def per_step_loss(loss_fn: Callable, config: ModelConfig, step: jax.Array) -> Callable:
    """Wraps a training loss `loss_fn(params, memory, moe_bias, batch) -> (total, (loss, aux,
    moe_bias))` whose forward pass reads `batch["ffn_granularity"]`.

    MatFormer off: `loss_fn` itself. "sample": one granularity per step (`sample_granularity`).
    "all": the mean of every granularity's loss; aux and MoE biases are those of the full width.
    """
    m = config.matformer
    if not m.enabled:
        return loss_fn

    def at(batch, index):
        return {**batch, "ffn_granularity": jnp.asarray(index, jnp.int32)}

    if m.sampling == "sample":
        return lambda p, mem, bias, batch: loss_fn(
            p, mem, bias, at(batch, sample_granularity(m, step))
        )

    def mean_over_all(params, memory, moe_bias, batch):
        outs = [
            loss_fn(params, memory, moe_bias, at(batch, i)) for i in range(len(m.granularities))
        ]
        total = sum(o[0] for o in outs) / len(outs)
        loss = sum(o[1][0] for o in outs) / len(outs)
        return total, (loss, *outs[-1][1][1:])

    return mean_over_all
