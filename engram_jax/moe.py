"""Feed-forward layers: the dense SwiGLU `MLP` and the DeepSeek-V3-style `MoE` (sigmoid router,
auxiliary-loss-free bias balancing, shared + routed experts, sort-based dispatch without dense
compute).

Dispatches of the routed experts (`MoE.dispatch`):
  - "dropless" (default): every (token, expert) pair is computed, as in DeepSeek-V3. The X*K slots
    are sorted by expert, each expert's group is padded to a multiple of a block of rows, and a
    scan runs one `[block, D] x [D, F]` SwiGLU per block with that block's expert weights
    (`expert_ffn_dropless`). A token's output depends on that token alone: bit for bit, whatever
    the other tokens of the call (see the function's docstring for why).
  - "capacity": `[E, C, D]` buffers of C slots per expert; slots over capacity are dropped. Which
    slot overflows depends on every token of the call, later ones included, so this dispatch is
    NOT causal (a later token can change an earlier token's output) unless `capacity_factor >=
    E / K`. Kept for comparison and for expert-parallel layouts.
  - "ragged": dropless through `lax.ragged_dot`, which TPU and GPU lower to grouped kernels; XLA:CPU
    lowers it to a masked dense matmul over all experts (many times slower there).

Equation numbers refer to the DeepSeek-V3 technical report (arXiv:2412.19437, Sec. 2.1.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import axes, input_checks
from engram_jax.matformer import at_width

Initializer = Callable[..., jax.Array]
Dispatch = Literal["dropless", "capacity", "ragged"]
DISPATCHES: tuple[str, ...] = ("dropless", "capacity", "ragged")
# Rows per block of the dropless dispatch (`dropless_block_size` lowers it for small calls). 128
# and 256 tie on 2 CPU cores in `engram_jax.bench.moe`; smaller blocks run more, smaller matmuls.
DEFAULT_BLOCK_SIZE = 128

# The bias of auxiliary-loss-free balancing is not trained by gradients: it lives in its own
# collection, which the training loop passes to `apply` and updates with `update_router_bias` after
# each step.
BIAS_COLLECTION = "moe_bias"


# --------------------------------------------------------------------------------------------------
# Pure functions.
# --------------------------------------------------------------------------------------------------


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """SwiGLU feed-forward `(silu(x W_gate) * (x W_up)) W_down` in the dtype of its inputs.

    Args:
      x: `[..., D]`.
      w_gate: `[D, F]`.
      w_up: `[D, F]`.
      w_down: `[F, D]`.

    Returns:
      `[..., D]`.
    """
    # One token axis: the weight gradients then contract one axis, not B and T (faster on XLA:CPU,
    # see layers.token_einsum; values agree to float rounding). The kernels are 2-D: one expert.
    x_ND = x.reshape(-1, x.shape[-1])  # [..., D] -> [N, D]
    h_NF = jax.nn.silu(x_ND @ w_gate) * (x_ND @ w_up)  # [N, F]
    return (h_NF @ w_down).reshape(*x.shape[:-1], w_down.shape[-1])  # [N, D] -> [..., D]


def route(
    logits_XE: jax.Array, bias_E: jax.Array, top_k: int, routed_scaling_factor: float = 1.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sigmoid top-k routing with a selection-only bias (DeepSeek-V3 Eqs. 13-16), in float32.

    The bias moves which experts are selected but never the gate values, so balancing costs no
    gradient interference (Eq. 16).

    Args:
      logits_XE: router logits `u_t^T e_i`, `[X, E]` (cast to float32).
      bias_E: per-expert balancing bias `b_i`, `[E]`.
      top_k: experts per token K.
      routed_scaling_factor: multiplies the normalised gates.

    Returns:
      `(scores_XE, gates_XK, experts_XK)`: affinities `s = sigmoid(logits)` (Eq. 15); gate values
      `g = s / sum_{topk} s * routed_scaling_factor` (Eq. 13) of the selected experts; selected
      expert ids (int32), ordered by decreasing `s + b`.
    """
    num_experts = logits_XE.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"route: top_k={top_k}; expected 1 <= top_k <= num_experts={num_experts}")
    if bias_E.shape != (num_experts,):
        raise ValueError(f"route: bias has shape {bias_E.shape}; expected [E]=({num_experts},)")
    # f32: gate values are ratios of sigmoids; bf16 rounding would change both the selection and
    # the gates.
    scores_XE = jax.nn.sigmoid(logits_XE.astype(jnp.float32))
    biased_XE = scores_XE + bias_E.astype(jnp.float32)[None, :]  # [X, E] + [1, E]
    _, experts_XK = jax.lax.top_k(biased_XE, top_k)  # Eq. 16: the bias acts on the selection only
    selected_XK = jnp.take_along_axis(scores_XE, experts_XK, axis=-1)  # Eq. 14: s_i, not s_i + b_i
    gates_XK = selected_XK / jnp.sum(selected_XK, axis=-1, keepdims=True) * routed_scaling_factor
    return scores_XE, gates_XK, experts_XK.astype(jnp.int32)


def sequence_balance_loss(
    scores_BTE: jax.Array, experts_BTK: jax.Array, mask_BT: jax.Array | None = None
) -> jax.Array:
    """Sequence-wise balance loss `sum_i f_i P_i` (DeepSeek-V3 Eqs. 17-20), without weight alpha.

    Per sequence: `f_i = E / (K T) * #{t : i in topk(t)}` (no gradient) and `P_i = mean_t s'_{i,t}`
    with `s'` the affinities normalised over all experts; the result is averaged over the batch. It
    equals 1 when routing and affinities are uniform. With a mask, T counts a row's unmasked tokens
    only, masked tokens enter neither f nor P, and rows without tokens are left out of the mean.

    Args:
      scores_BTE: sigmoid affinities, `[B, T, E]`.
      experts_BTK: selected expert ids, `[B, T, K]`.
      mask_BT: optional `[B, T]`; positions with `mask <= 0` (padding) are ignored.

    Returns:
      float32 scalar.
    """
    b, t, num_experts = scores_BTE.shape
    top_k = experts_BTK.shape[-1]
    scores_BTE = scores_BTE.astype(jnp.float32)
    if mask_BT is None:
        valid_BT = jnp.ones((b, t), jnp.float32)
    else:
        valid_BT = (mask_BT > 0).astype(jnp.float32)
    count_B = jnp.sum(valid_BT, axis=1)
    per_token_B = 1.0 / jnp.maximum(count_B, 1.0)  # 1 / T of each row
    selected_BTE = jnp.sum(jax.nn.one_hot(experts_BTK, num_experts, dtype=jnp.float32), axis=2)
    selected_BTE = selected_BTE * valid_BT[:, :, None]  # [B, T, E] * [B, T, 1]
    f_BE = jnp.sum(selected_BTE, axis=1) * (num_experts / top_k) * per_token_B[:, None]  # Eq. 18
    normalised_BTE = scores_BTE / jnp.sum(scores_BTE, axis=-1, keepdims=True)  # Eq. 19
    p_BE = jnp.sum(normalised_BTE * valid_BT[:, :, None], axis=1) * per_token_B[:, None]  # Eq. 20
    loss_B = jnp.sum(jax.lax.stop_gradient(f_BE) * p_BE, axis=-1)  # Eq. 17 / alpha
    has_tokens_B = (count_B > 0).astype(jnp.float32)
    return jnp.sum(loss_B * has_tokens_B) / jnp.maximum(jnp.sum(has_tokens_B), 1.0)


def update_router_bias(bias_E: jax.Array, load_E: jax.Array, rate: float = 0.001) -> jax.Array:
    """Loss-free balancing (DeepSeek-V3 Sec. 2.1.2): `b += rate * sign(mean(load) - load)`.

    Overloaded experts get a lower bias, underloaded ones a higher one. `rate` is the paper's bias
    update speed gamma (0.001 for most of DeepSeek-V3's training). Apply after each optimizer step.

    Args:
      bias_E: current bias, `[E]`.
      load_E: tokens (or fraction of routed slots) per expert in the last step, `[E]`; any scale.
      rate: the update speed gamma, finite and >= 0 (0 freezes the bias).

    Returns:
      The new bias, `[E]`, in the dtype of `bias_E`.

    Raises:
      ValueError: shapes differ; `rate` is negative or not finite (checked when it is a concrete
        number); concrete loads hold NaN or inf. Under `jit` a non-finite load cannot raise:
        the bias is then returned unchanged (a step with a NaN load moves no expert); debug
        checks (`input_checks`) turn it into a checkify error.
    """
    if bias_E.shape != load_E.shape or bias_E.ndim != 1:
        raise ValueError(
            f"update_router_bias: bias has shape {bias_E.shape} and load {load_E.shape}; "
            "expected both [E]"
        )
    if not input_checks.is_traced(rate) and not 0 <= float(rate) < math.inf:
        raise ValueError(
            f"update_router_bias: rate={rate}; expected a finite number >= 0 (a negative rate "
            "pushes load towards the busiest experts)"
        )
    input_checks.check_finite(load_E, "update_router_bias: load")
    load_E = load_E.astype(jnp.float32)
    step_E = rate * jnp.sign(jnp.mean(load_E, keepdims=True) - load_E)  # [1] - [E]: same rank
    step_E = jnp.where(jnp.all(jnp.isfinite(load_E)), step_E, 0.0)  # [E]
    return (bias_E.astype(jnp.float32) + step_E).astype(bias_E.dtype)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert `C = min(X, ceil(capacity_factor * X * K / E))` for capacity dispatch.

    A token picks an expert at most once, so `C = X` never drops: `capacity_factor >= E / K`.
    """
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def _sort_slots(experts_SE: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stable sort of slot expert ids -> `(order_S, group_sizes_E, rank_S)`, rank within expert."""
    (s,) = experts_SE.shape
    order_S = jnp.argsort(experts_SE, stable=True)  # slots grouped by expert, priority order kept
    group_sizes_E = jnp.bincount(experts_SE, length=num_experts).astype(jnp.int32)
    starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    sorted_rank_S = jnp.arange(s, dtype=jnp.int32) - jnp.take(starts_E, experts_SE[order_S])
    rank_S = jnp.zeros((s,), jnp.int32).at[order_S].set(sorted_rank_S)  # undo the sort
    return order_S, group_sizes_E, rank_S


def _check_expert_args(x_XD, experts_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD) -> None:
    x, d = x_XD.shape
    e, d2, f = w_gate_EDF.shape
    if d2 != d or w_up_EDF.shape != (e, d, f) or w_down_EFD.shape != (e, f, d):
        raise ValueError(
            f"expert weights: got w_gate {w_gate_EDF.shape}, w_up {w_up_EDF.shape}, "
            f"w_down {w_down_EFD.shape} for x {x_XD.shape}; "
            "expected [E, D, F], [E, D, F], [E, F, D]"
        )
    if experts_XK.shape != gates_XK.shape or experts_XK.shape[0] != x:
        raise ValueError(
            f"routing: experts {experts_XK.shape} and gates {gates_XK.shape}; "
            f"expected both [X={x}, K]"
        )


def dropless_block_size(
    num_slots: int, num_experts: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> int:
    """Rows per block of the dropless dispatch: `block_size`, or less for small calls.

    The block is at most the largest power of two <= `num_slots / num_experts`, so the padding
    (at most `E * (block - 1)` rows) stays below the slots themselves when a call routes few tokens
    (decoding routes one per sequence).
    """
    per_expert = max(1, num_slots // num_experts)
    return max(1, min(block_size, 1 << (per_expert.bit_length() - 1)))


def _dropless_layout(
    experts_S: jax.Array, num_experts: int, block: int
) -> tuple[jax.Array, jax.Array, int]:
    """Rows of the slots when sorted by expert, each expert's group padded to a block multiple.

    Returns:
      `(row_S, block_expert_Nb, num_blocks)`: the row of each slot in the padded buffer, the expert
      of each block, and the static block count `floor((S + E (block - 1)) / block)`, an upper
      bound on `sum_e ceil(n_e / block)` for any split of S slots into E groups. Blocks past the
      last group hold only padding rows and take the last expert.
    """
    (s,) = experts_S.shape
    num_blocks = (s + num_experts * (block - 1)) // block
    _, group_sizes_E, rank_S = _sort_slots(experts_S, num_experts)
    padded_E = (group_sizes_E + block - 1) // block * block
    padded_end_E = jnp.cumsum(padded_E)
    row_S = jnp.take(padded_end_E - padded_E, experts_S) + rank_S  # group start + rank in group
    block_start_Nb = jnp.arange(num_blocks, dtype=jnp.int32) * block
    # Block j belongs to the group whose padded range holds its first row.
    block_expert_Nb = jnp.searchsorted(padded_end_E, block_start_Nb, side="right")
    block_expert_Nb = jnp.minimum(block_expert_Nb, num_experts - 1).astype(jnp.int32)
    return row_S, block_expert_Nb, num_blocks


def _grouped_swiglu(
    x_NbBD: jax.Array,
    block_expert_Nb: jax.Array,
    w_gate_EDF: jax.Array,
    w_up_EDF: jax.Array,
    w_down_EFD: jax.Array,
) -> jax.Array:
    """`y[j] = swiglu(x[j], W[e_j])` for each block j: `[Nb, block, D] -> [Nb, block, D]`."""

    def one_block(x_BD, expert):
        return swiglu(x_BD, w_gate_EDF[expert], w_up_EDF[expert], w_down_EFD[expert])

    # Keep only the matmul outputs for the backward pass; plain autodiff would also keep every
    # block's sliced [D, F] weights, Nb / E times the expert weights.
    one_block = jax.checkpoint(
        one_block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    )
    _, y_NbBD = jax.lax.scan(
        lambda carry, inputs: (carry, one_block(*inputs)), None, (x_NbBD, block_expert_Nb)
    )
    return y_NbBD


def expert_ffn_dropless(
    x_XD: jax.Array,
    experts_XK: jax.Array,
    gates_XK: jax.Array,
    w_gate_EDF: jax.Array,
    w_up_EDF: jax.Array,
    w_down_EFD: jax.Array,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """Dropless routed experts: sort slots by expert into block-padded rows, one SwiGLU per block.

    The X*K (token, expert) slots are stably sorted by expert; each expert's group is padded with
    zero rows to a multiple of the block (`dropless_block_size`); a scan applies each block's
    expert FFN to its `[block, D]` rows; the outputs return to slot order and are combined with the
    gates in float32, summed over k in a fixed order. At most `X*K + E*(block - 1)` rows are
    computed (static), against `capacity_factor * X*K` for capacity dispatch, and no per-block
    copy of the weights is kept for the backward pass.

    Causality: a slot's row in the buffer depends on the other tokens, but its value does not.
    Every block runs the same `[block, D] x [D, F]` matmuls (static shapes), so a row's result
    depends only on that row and the expert's weights, provided the matmul computes each output
    row the same way wherever the row sits; tests/test_moe.py checks this for XLA:CPU, where it
    holds. Across calls of different sizes (another block size) results agree to rounding only.

    Args:
      x_XD, experts_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD: as in `expert_ffn_ragged`.
      block_size: upper bound of the rows per block (see `dropless_block_size`).

    Returns:
      `sum_k gates[x, k] * FFN_{experts[x, k]}(x)`, `[X, D]` in the dtype of `x_XD`.
    """
    _check_expert_args(x_XD, experts_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD)
    if block_size < 1:
        raise ValueError(f"expert_ffn_dropless: block_size={block_size}; expected >= 1")
    x, d = x_XD.shape
    num_experts = w_gate_EDF.shape[0]
    top_k = experts_XK.shape[1]
    block = dropless_block_size(x * top_k, num_experts, block_size)
    experts_S = experts_XK.reshape(-1)  # [X*K], slot s = token * K + k
    row_S, block_expert_Nb, num_blocks = _dropless_layout(experts_S, num_experts, block)
    n = num_blocks * block
    tokens_S = jnp.arange(x * top_k, dtype=jnp.int32) // top_k
    # Which token fills each row; padding rows read the appended zero row (index X).
    row_tokens_N = jnp.full((n,), x, jnp.int32).at[row_S].set(tokens_S, unique_indices=True)
    x_pad_XD = jnp.concatenate([x_XD, jnp.zeros((1, d), x_XD.dtype)], axis=0)  # [X+1, D]
    x_NbBD = jnp.take(x_pad_XD, row_tokens_N, axis=0).reshape(num_blocks, block, d)
    y_NbBD = _grouped_swiglu(x_NbBD, block_expert_Nb, w_gate_EDF, w_up_EDF, w_down_EFD)
    y_XKD = jnp.take(y_NbBD.reshape(n, d), row_S, axis=0).reshape(x, top_k, d)  # slot order
    # f32 combine: the K-term sum of gated outputs, in k order for every token.
    y_XD = jnp.einsum("xk,xkd->xd", gates_XK.astype(jnp.float32), y_XKD.astype(jnp.float32))
    return y_XD.astype(x_XD.dtype)


def expert_ffn_ragged(
    x_XD: jax.Array,
    experts_XK: jax.Array,
    gates_XK: jax.Array,
    w_gate_EDF: jax.Array,
    w_up_EDF: jax.Array,
    w_down_EFD: jax.Array,
) -> jax.Array:
    """Dropless routed experts: sort the X*K slots by expert, `lax.ragged_dot`, unsort, combine.

    No token is dropped. Cost is the K*X slots' FFN where `ragged_dot` has a grouped kernel (TPU);
    XLA:CPU lowers `ragged_dot` to a masked dense matmul over all E groups, so on CPU this costs E
    x the slots.

    Args:
      x_XD: tokens in the compute dtype, `[X, D]`.
      experts_XK: selected expert ids, `[X, K]`.
      gates_XK: gate values (float32), `[X, K]`.
      w_gate_EDF, w_up_EDF: `[E, D, F]`.
      w_down_EFD: `[E, F, D]`.

    Returns:
      `sum_k gates[x, k] * FFN_{experts[x, k]}(x)`, `[X, D]` in the dtype of `x_XD`.
    """
    _check_expert_args(x_XD, experts_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD)
    x, d = x_XD.shape
    num_experts = w_gate_EDF.shape[0]
    top_k = experts_XK.shape[1]
    # Slot s = k * X + token: k-major, as in the capacity path.
    experts_S = experts_XK.T.reshape(-1)  # [K*X]
    order_S, group_sizes_E, _ = _sort_slots(experts_S, num_experts)
    tokens_S = order_S % x  # token of each sorted slot
    x_SD = jnp.take(x_XD, tokens_S, axis=0)  # [K*X, D], grouped by expert
    h_SF = jax.nn.silu(jax.lax.ragged_dot(x_SD, w_gate_EDF, group_sizes_E)) * jax.lax.ragged_dot(
        x_SD, w_up_EDF, group_sizes_E
    )  # [K*X, F]
    y_sorted_SD = jax.lax.ragged_dot(h_SF, w_down_EFD, group_sizes_E)  # [K*X, D]
    y_SD = jnp.zeros_like(y_sorted_SD).at[order_S].set(y_sorted_SD)  # back to slot order
    y_KXD = y_SD.reshape(top_k, x, d)
    # f32 combine: the K-term sum of gated outputs.
    y_XD = jnp.einsum("kx,kxd->xd", gates_XK.T.astype(jnp.float32), y_KXD.astype(jnp.float32))
    return y_XD.astype(x_XD.dtype)


def expert_ffn_capacity(
    x_XD: jax.Array,
    experts_XK: jax.Array,
    gates_XK: jax.Array,
    w_gate_EDF: jax.Array,
    w_up_EDF: jax.Array,
    w_down_EFD: jax.Array,
    capacity: int,
    valid_X: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Routed experts with capacity C each: gather into `[E, C, D]`, batched FFN, gather back.

    Slots are ranked k-major (every token's first choice before any second choice), then by token
    index; a slot ranked `>= C` within its expert is dropped, i.e. contributes zero (the token
    still gets the shared experts and the residual). Slot positions come from a stable sort, and
    buffers are filled by index (gather), not by one-hot `[X, E, C]` dispatch tensors, whose size
    grows with X^2.

    Not causal: whether a slot is dropped depends on every token of the call, later ones and
    other rows included. Only `C >= X` (`capacity_factor >= E / K`) drops nothing.

    Args:
      x_XD, experts_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD: as in `expert_ffn_ragged`.
      capacity: slots per expert C (see `expert_capacity`).
      valid_X: optional bool `[X]`; False (padding) tokens take no slot and get no routed output.

    Returns:
      `(y_XD, dropped_fraction)`: the combined output `[X, D]` in the dtype of `x_XD`, and the
      float32 fraction of the (valid) tokens' slots dropped.
    """
    _check_expert_args(x_XD, experts_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD)
    x, d = x_XD.shape
    num_experts = w_gate_EDF.shape[0]
    top_k = experts_XK.shape[1]
    c = capacity
    experts_S = experts_XK.T.reshape(-1)  # [K*X], slot s = k * X + token
    if valid_X is None:
        valid_S = jnp.ones((top_k * x,), bool)
        _, _, rank_S = _sort_slots(experts_S, num_experts)
    else:
        valid_S = jnp.tile(valid_X.astype(bool), top_k)  # [K*X]
        # Padding slots form an extra group E after all experts: they never take a slot.
        _, _, rank_S = _sort_slots(jnp.where(valid_S, experts_S, num_experts), num_experts + 1)
    kept_S = (rank_S < c) & valid_S
    # Flat buffer index e * C + rank; dropped slots point one past the end.
    buffer_S = jnp.where(kept_S, experts_S * c + rank_S, num_experts * c)
    tokens_S = jnp.arange(top_k * x, dtype=jnp.int32) % x
    # Which token fills each buffer slot; empty slots read the appended zero row (index X).
    buffer_tokens_N = (
        jnp.full((num_experts * c,), x, jnp.int32).at[buffer_S].set(tokens_S, mode="drop")
    )
    x_pad_XD = jnp.concatenate([x_XD, jnp.zeros((1, d), x_XD.dtype)], axis=0)  # [X+1, D]
    x_ECD = jnp.take(x_pad_XD, buffer_tokens_N, axis=0).reshape(num_experts, c, d)
    x_ECD = nn.with_logical_constraint(x_ECD, (axes.ACT_EXPERTS, None, axes.ACT_EMBED))
    h_ECF = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ECD, w_gate_EDF)) * jnp.einsum(
        "ecd,edf->ecf", x_ECD, w_up_EDF
    )
    y_ECD = jnp.einsum("ecf,efd->ecd", h_ECF, w_down_EFD)
    y_ND = y_ECD.reshape(num_experts * c, d)
    y_SD = jnp.take(y_ND, buffer_S, axis=0, mode="fill", fill_value=0)  # [K*X, D]; dropped -> 0
    y_KXD = y_SD.reshape(top_k, x, d)
    y_XD = jnp.einsum("kx,kxd->xd", gates_XK.T.astype(jnp.float32), y_KXD.astype(jnp.float32))
    num_valid = jnp.maximum(jnp.sum(valid_S.astype(jnp.float32)), 1.0)
    dropped_fraction = 1.0 - jnp.sum(kept_S.astype(jnp.float32)) / num_valid
    return y_XD.astype(x_XD.dtype), dropped_fraction


def _stacked(init: Initializer) -> Initializer:
    """Applies a 2-D initializer to each expert of an `[E, ...]` kernel, so fan-in ignores E."""

    def stacked_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        keys = jax.random.split(key, shape[0])
        return jax.vmap(lambda k: init(k, shape[1:], dtype))(keys)

    return stacked_init


# --------------------------------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Dense SwiGLU feed-forward `(silu(x W_gate) * (x W_up)) W_down`, no biases.

    Parameters (collection "params"):
      w_gate: `[D, F]`, logical axes (EMBED, MLP).
      w_up:   `[D, F]`, logical axes (EMBED, MLP).
      w_down: `[F, D]`, logical axes (MLP, EMBED).
    Total `3 * D * F`.

    Attributes:
      hidden_size: F.
      dtype: compute dtype.
      param_dtype: storage dtype of the kernels.
      kernel_init: initializer of each kernel (fan-in scaled by default).
      nested_widths: MatFormer's nested hidden widths, ascending, the last F (() : off).
      granularity: which nested width runs (`matformer.at_width`: None is the full width, an
        int or a traced index).
    """

    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    nested_widths: tuple[int, ...] = ()
    granularity: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x: `[..., D]`. Returns: `[..., D]` in `dtype`."""
        if self.hidden_size < 1:
            raise ValueError(f"MLP.hidden_size: got {self.hidden_size}; expected >= 1")
        d, f = x.shape[-1], self.hidden_size
        init_in = nn.with_logical_partitioning(self.kernel_init, (axes.EMBED, axes.MLP))
        init_out = nn.with_logical_partitioning(self.kernel_init, (axes.MLP, axes.EMBED))
        w_gate = self.param("w_gate", init_in, (d, f), self.param_dtype)
        w_up = self.param("w_up", init_in, (d, f), self.param_dtype)
        w_down = self.param("w_down", init_out, (f, d), self.param_dtype)
        x, w_gate, w_up, w_down = nn.dtypes.promote_dtype(x, w_gate, w_up, w_down, dtype=self.dtype)
        # MatFormer: the first m hidden units ([:None] keeps them all).
        return at_width(
            lambda m: swiglu(x, w_gate[:, :m], w_up[:, :m], w_down[:m]),
            self.nested_widths,
            self.granularity,
        )


class MoE(nn.Module):
    """DeepSeek-V3-style mixture of experts: shared experts plus top-k of E routed SwiGLU experts.

    `y = sum_shared FFN_s(x) + sum_{i in topk(s + b)} g_i FFN_i(x)` (DeepSeek-V3 Eq. 12; the
    residual is the caller's), with sigmoid affinities `s_i = sigmoid(x^T e_i)` computed in float32
    (Eq. 15), gates `g_i = s_i / sum_{j in topk} s_j * routed_scaling_factor` (Eq. 13), and the
    balancing bias `b` used for the selection only (Eq. 16). The bias is in the "moe_bias"
    collection, outside the gradient; the training loop updates it with `update_router_bias(bias,
    stats["load"], rate)`.

    The `num_shared_experts` shared experts are fused into one `MLP` of width `num_shared_experts *
    F`: a SwiGLU is elementwise over F and its down projection sums over F, so this equals the sum
    of separate experts with the same weights, in one matmul.

    Variables (D = input width, E = num_experts, F = expert_hidden_size, S = num_shared_experts):
      params/router_kernel: `[D, E]`, axes (EMBED, None), stored in `param_dtype`, used in float32.
      params/w_gate:        `[E, D, F]`, axes (EXPERTS, EMBED, MLP).
      params/w_up:          `[E, D, F]`, axes (EXPERTS, EMBED, MLP).
      params/w_down:        `[E, F, D]`, axes (EXPERTS, MLP, EMBED).
      params/shared/w_gate: `[D, S*F]`, params/shared/w_up: `[D, S*F]`, params/shared/w_down:
                            `[S*F, D]` (an `MLP`; absent when S = 0).
      moe_bias/bias:        `[E]`, float32, zeros, axes (EXPERTS,); not a parameter.
    Parameters total `D*E + 3*E*D*F + 3*S*D*F`; activated per token `D*E + 3*(K+S)*D*F`.

    Attributes:
      num_experts: routed experts E.
      top_k: routed experts per token K, in [1, E].
      expert_hidden_size: F, the width of every routed and shared expert.
      num_shared_experts: S >= 0.
      routed_scaling_factor: multiplies the normalised routed gates (DeepSeek-V3: 2.5; default 1).
      seq_balance_weight: alpha of the sequence-wise balance loss (Eq. 17); 0 disables it.
      dispatch: "dropless" (default: every slot computed, causal; `expert_ffn_dropless`),
        "capacity" (`[E, C, D]` buffers, drops slots over capacity; NOT causal: a later token can
        drop an earlier token's slot) or "ragged" (dropless through `lax.ragged_dot`; a grouped
        kernel on TPU/GPU, dense cost on CPU). See the module docstring.
      capacity_factor: for "capacity": `C = ceil(capacity_factor * X * K / E)` slots per expert, X
        the tokens in the call; `>= E / K` never drops.
      block_size: for "dropless": rows per block (lowered for small calls, see
        `dropless_block_size`).
      dtype: compute dtype of the experts; routing is float32 regardless.
      param_dtype: storage dtype of the parameters.
      kernel_init: 2-D initializer for the router, the shared experts and each routed expert.
      bias_update_rate: when > 0 and the "moe_bias" collection is mutable (a training step's
        `apply(..., mutable=["moe_bias"])`), the call updates the balancing bias from this call's
        load with `update_router_bias` (DeepSeek-V3's gamma); the update is outside the gradient.
    """

    num_experts: int
    top_k: int
    expert_hidden_size: int
    num_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    seq_balance_weight: float = 1e-4
    dispatch: Dispatch = "dropless"
    capacity_factor: float = 1.25
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_update_rate: float = 0.0
    nested_widths: tuple[int, ...] = ()  # MatFormer widths of every expert (see `MLP`).
    granularity: Any = None

    def _validate(self, x_BTD: jax.Array, mask_BT: jax.Array | None) -> None:
        if self.num_experts < 1:
            raise ValueError(f"MoE.num_experts: got {self.num_experts}; expected >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"MoE.top_k: got {self.top_k}; "
                f"expected 1 <= top_k <= num_experts={self.num_experts}"
            )
        if self.expert_hidden_size < 1:
            raise ValueError(
                f"MoE.expert_hidden_size: got {self.expert_hidden_size}; expected >= 1"
            )
        if self.num_shared_experts < 0:
            raise ValueError(
                f"MoE.num_shared_experts: got {self.num_shared_experts}; expected >= 0"
            )
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"MoE.dispatch: got {self.dispatch!r}; expected one of {DISPATCHES}")
        if not self.capacity_factor > 0:
            raise ValueError(f"MoE.capacity_factor: got {self.capacity_factor}; expected > 0")
        if self.block_size < 1:
            raise ValueError(f"MoE.block_size: got {self.block_size}; expected >= 1")
        if self.seq_balance_weight < 0:
            raise ValueError(
                f"MoE.seq_balance_weight: got {self.seq_balance_weight}; expected >= 0"
            )
        if x_BTD.ndim != 3:
            raise ValueError(f"MoE: x has shape {x_BTD.shape}; expected [B, T, D]")
        if mask_BT is not None and tuple(mask_BT.shape) != x_BTD.shape[:2]:
            raise ValueError(
                f"MoE: mask has shape {tuple(mask_BT.shape)}; expected [B, T] = "
                f"{x_BTD.shape[:2]} (the input's)"
            )

    @nn.compact
    def __call__(
        self, x_BTD: jax.Array, mask_BT: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Applies shared and routed experts.

        Args:
          x_BTD: `[B, T, D]`.
          mask_BT: optional `[B, T]` (e.g. the loss mask); positions with `mask <= 0` are padding
            and are left out of the routing statistics: `load`, `tokens_per_expert`, the balance
            loss and the bias update count real tokens only, and under "capacity" padding takes no
            slot (its routed output is zero). The dropless dispatches still compute padding
            tokens' outputs, which no other token sees.

        Returns:
          `(y_BTD, stats)`: `y_BTD` in `dtype`, without the residual; `stats` (float32) has
          `load` `[E]` (fraction of the routed slots of unmasked tokens per expert, sums to 1,
          counted before any capacity drop; 0 when every token is masked), `tokens_per_expert`
          `[E]` (slot counts), `max_violation` (`max(load) * E - 1`, 0 when balanced),
          `balance_loss` (`seq_balance_weight * Eq. 17`, already weighted; 0 when disabled) and
          `dropped_fraction` (slots dropped by capacity; 0 for the dropless dispatches).
        """
        self._validate(x_BTD, mask_BT)
        b, t, d = x_BTD.shape
        router_kernel, w_gate, w_up, w_down, bias_var = self._variables(d)
        bias_E = bias_var.value

        # Routing in float32 from the input as given (before any cast to a bf16 compute dtype).
        x_XD32 = x_BTD.reshape(b * t, d).astype(jnp.float32)
        logits_XE = x_XD32 @ router_kernel.astype(jnp.float32)  # [X, D] @ [D, E]
        scores_XE, gates_XK, experts_XK = route(
            logits_XE, jax.lax.stop_gradient(bias_E), self.top_k, self.routed_scaling_factor
        )
        valid_X = None if mask_BT is None else mask_BT.reshape(b * t) > 0

        def routed(m: int | None) -> tuple[jax.Array, jax.Array]:
            # MatFormer: every expert's first m hidden units ([:None] keeps them all).
            weights = (w_gate[:, :, :m], w_up[:, :, :m], w_down[:, :m])
            return self._dispatch(x_BTD.reshape(b * t, d), experts_XK, gates_XK, weights, valid_X)

        routed_XD, dropped_fraction = at_width(routed, self.nested_widths, self.granularity)
        y_BTD = routed_XD.reshape(b, t, d)  # [X, D] -> [B, T, D]
        if self.num_shared_experts > 0:
            shared = MLP(
                hidden_size=self.num_shared_experts * self.expert_hidden_size,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=self.kernel_init,
                nested_widths=tuple(self.num_shared_experts * m for m in self.nested_widths),
                granularity=self.granularity,
                name="shared",
            )
            y_BTD = y_BTD + shared(x_BTD)
        y_BTD = nn.with_logical_constraint(y_BTD, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))

        stats = self._routing_stats(scores_XE, experts_XK, valid_X, mask_BT, (b, t))
        stats["dropped_fraction"] = dropped_fraction
        if (
            self.bias_update_rate > 0
            and self.is_mutable_collection(BIAS_COLLECTION)
            and not self.is_initializing()
        ):
            bias_var.value = update_router_bias(
                bias_E, jax.lax.stop_gradient(stats["load"]), self.bias_update_rate
            )
        return y_BTD.astype(self.dtype), stats

    def _variables(self, d: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, Any]:
        """The router, the stacked routed experts and the balancing-bias variable, declared in
        this order (the order fixes each parameter's init draw)."""
        e, f = self.num_experts, self.expert_hidden_size
        router_kernel = self.param(
            "router_kernel",
            nn.with_logical_partitioning(self.kernel_init, (axes.EMBED, None)),
            (d, e),
            self.param_dtype,
        )
        expert_init = _stacked(self.kernel_init)

        def expert_weights(name: str, logical_axes: tuple, shape: tuple[int, ...]) -> jax.Array:
            init = nn.with_logical_partitioning(expert_init, logical_axes)
            return self.param(name, init, shape, self.param_dtype)

        w_gate = expert_weights("w_gate", (axes.EXPERTS, axes.EMBED, axes.MLP), (e, d, f))
        w_up = expert_weights("w_up", (axes.EXPERTS, axes.EMBED, axes.MLP), (e, d, f))
        w_down = expert_weights("w_down", (axes.EXPERTS, axes.MLP, axes.EMBED), (e, f, d))
        bias_var = self.variable(
            BIAS_COLLECTION,
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.EXPERTS,)),
            jax.random.PRNGKey(0),  # unused by zeros; no draw from the "params" stream
            (e,),
            jnp.float32,
        )
        return router_kernel, w_gate, w_up, w_down, bias_var

    def _dispatch(
        self,
        x_XD: jax.Array,
        experts_XK: jax.Array,
        gates_XK: jax.Array,
        weights: tuple[jax.Array, jax.Array, jax.Array],
        valid_X: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        """`(routed_XD, dropped_fraction)`: the gated routed experts' sum per token, in `dtype`,
        by the configured dispatch."""
        x_XD, w_gate, w_up, w_down = nn.dtypes.promote_dtype(x_XD, *weights, dtype=self.dtype)
        if self.dispatch == "dropless":
            routed_XD = expert_ffn_dropless(
                x_XD, experts_XK, gates_XK, w_gate, w_up, w_down, self.block_size
            )
            return routed_XD, jnp.zeros((), jnp.float32)
        if self.dispatch == "ragged":
            routed_XD = expert_ffn_ragged(x_XD, experts_XK, gates_XK, w_gate, w_up, w_down)
            return routed_XD, jnp.zeros((), jnp.float32)
        capacity = expert_capacity(
            x_XD.shape[0], self.top_k, self.num_experts, self.capacity_factor
        )
        return expert_ffn_capacity(
            x_XD, experts_XK, gates_XK, w_gate, w_up, w_down, capacity, valid_X
        )

    def _routing_stats(
        self,
        scores_XE: jax.Array,
        experts_XK: jax.Array,
        valid_X: jax.Array | None,
        mask_BT: jax.Array | None,
        batch_shape: tuple[int, int],
    ) -> dict[str, jax.Array]:
        """Load, slot counts, violation and the weighted balance loss of the unmasked tokens."""
        b, t = batch_shape
        e, k = self.num_experts, self.top_k
        if valid_X is None:
            tokens_per_expert_E = jnp.bincount(experts_XK.reshape(-1), length=e)
            num_slots = jnp.asarray(b * t * k, jnp.float32)
        else:
            slot_weights_XK = jnp.broadcast_to(valid_X[:, None], (b * t, k)).astype(jnp.float32)
            tokens_per_expert_E = jnp.bincount(
                experts_XK.reshape(-1), weights=slot_weights_XK.reshape(-1), length=e
            )
            num_slots = jnp.sum(slot_weights_XK)
        tokens_per_expert_E = tokens_per_expert_E.astype(jnp.float32)
        load_E = tokens_per_expert_E / jnp.maximum(num_slots, 1.0)
        if self.seq_balance_weight > 0:
            balance_loss = self.seq_balance_weight * sequence_balance_loss(
                scores_XE.reshape(b, t, e), experts_XK.reshape(b, t, k), mask_BT
            )
        else:
            balance_loss = jnp.zeros((), jnp.float32)
        return {
            "load": load_E,
            "tokens_per_expert": tokens_per_expert_E,
            "max_violation": jnp.max(load_E) * e - 1.0,
            "balance_loss": balance_loss,
        }
