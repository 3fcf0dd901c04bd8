"""Engram conditional memory: multi-head table lookup, context-aware gate, and one of two layer
forms (`Engram.form`).

- "demo" (docs/design.md §1.4-1.6, the paper's demo): G per-stream key projections and one value
  projection, all with bias; gate `sigmoid(signed_sqrt(<RMSNorm_q(h), RMSNorm_k(k)> / sqrt(D)))`;
  then a causal short convolution, `Y = V~ + SiLU(conv(RMSNorm(V~)))`.
- "v41" (docs/design.md §14): no convolution; one fused projection `wkv` of the
  concatenated rows to G keys (one per residual stream) plus one shared value; the same gate
  written with the release's per-stream RMSNorm gains `q_weight`, `k_weight` and a two-way sign
  (`copysign`), and the one gated value added to every stream.

Both forms share hashing, the table (`lookup_rows`), its placements and optimizers. Pure functions
hold the maths; `Engram` is the thin Linen module that owns the parameters. Hash ids are computed on
the host (`hashing.py`); this module only consumes them.

Checkpoint mapping of the V4.1 form (released safetensors names -> this module's "params" of the
Engram at layer i; D = hidden size, G = hc_mult, M = orders x heads, W = row width, R = rows):

  layers.{i}.engram.embed.weight  [R, W]            -> table     [R, W]     (same layout; FP8
                                                                  rows + `.scale` are dequantised
                                                                  or kept by the table's dtype)
  layers.{i}.engram.wkv.weight    [(G + 1) * D, M*W] -> wkv      [M*W, G + 1, D]
                                                        = weight.T.reshape(M*W, G + 1, D)
                                                        (rows g*D..(g+1)*D-1 are stream g's key,
                                                        the last D rows the shared value; a
                                                        32 x 32 block `.scale` is applied first)
  layers.{i}.engram.q_weight      [G, D]            -> q_weight  [G, D]     (copied)
  layers.{i}.engram.k_weight      [G, D]            -> k_weight  [G, D]     (copied)
  (none in the release)                             -> wkv_bias  [G + 1, D] only with wkv_bias=True

The row order of the concatenated memory (head-major, order-major heads as `hashing.py` emits them)
is assumed to be the release's; it is not verified against the released checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import axes
from engram_jax.layers import rms_norm, token_einsum

Initializer = Callable[..., jax.Array]
# lookup_fn(table_RW, flat_ids_BTM) -> rows_BTMW; ids outside [0, R) must give zero rows.
LookupFn = Callable[[jax.Array, jax.Array], jax.Array]

# PyTorch's default RMSNorm eps for f32 inputs (machine epsilon), used by the demo's key/query norms
# (docs/design.md §1.5). Whether the paper's models used it is unverified (§9.6).
TORCH_F32_EPS = 1.1920929e-07
# Layer forms (`Engram.form`, config `model.engram.form`).
FORMS = ("demo", "v41")


# ------------------------------------------------------------------------------------------------
# Pure functions.
# ------------------------------------------------------------------------------------------------


def head_offsets(head_vocab_sizes: Sequence[int]) -> np.ndarray:
    """Row offset of each head in the flat table: exclusive prefix sums (docs/design.md §1.4).

    Args:
      head_vocab_sizes: rows per head, order-major (`[p_{2,0..K-1}, p_{3,0..K-1}, ...]`).

    Returns:
      `[M]` int64 numpy array; `offsets[m] = sum(head_vocab_sizes[:m])`.
    """
    sizes_M = np.asarray(head_vocab_sizes, dtype=np.int64)
    return np.concatenate([np.zeros((1,), np.int64), np.cumsum(sizes_M)[:-1]])


def validate_hash_ids(
    hash_ids: Any, head_vocab_sizes: Sequence[int], name: str = "hash_ids"
) -> None:
    """Checks on the host that every hash id lies in its head's range `[0, head_vocab_sizes[m])`.

    The data pipeline calls this (numpy, no device work); `Engram` also calls it when it is given
    concrete arrays. Under `jit` ids are tracers and cannot be checked here: an out-of-range id then
    reads a zero row (see `lookup_rows`) unless `check_hash_ids_traced` (`Engram(check_ids=True)`)
    runs under `checkify`.

    Args:
      hash_ids: `[..., M]` integer array (numpy or a concrete jax array).
      head_vocab_sizes: `[M]` rows per head.
      name: argument name used in error messages.

    Raises:
      TypeError: if the ids are not integers.
      ValueError: if the last axis is not M, or an id is out of its head's range (the message
        names the head and the value).
    """
    ids = np.asarray(hash_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} has dtype {ids.dtype}; expected an integer dtype (int32)")
    sizes_M = np.asarray(head_vocab_sizes, dtype=np.int64)
    if ids.ndim < 1 or ids.shape[-1] != sizes_M.shape[0]:
        raise ValueError(
            f"{name} has shape {ids.shape}; expected [..., M] with M={sizes_M.shape[0]} "
            "(one id per hash head)"
        )
    bad = (ids < 0) | (ids >= sizes_M)  # [..., M] vs [M] (numpy broadcasts over the last axis)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        head = where[-1]
        raise ValueError(
            f"{name}{list(where)} = {int(ids[where])} is out of range for head {head}; "
            f"expected 0 <= id < head_vocab_sizes[{head}] = {int(sizes_M[head])} "
            f"({int(bad.sum())} bad ids in total)"
        )


def check_hash_ids_traced(ids_BTM: jax.Array, head_vocab_sizes: Sequence[int]) -> None:
    """The range check of `validate_hash_ids` for traced ids, as a `checkify` check.

    Under `jit` ids are tracers, so `validate_hash_ids` cannot look at them and an out-of-range id
    silently reads a zero row. Calling this inside a function transformed by
    `jax.experimental.checkify.checkify` (e.g. `Engram(check_ids=True)` applied under
    `checkify.checkify(jax.jit(...))`) turns such an id into an error the caller can `throw()`.
    Without the checkify transformation JAX refuses the traced check at trace time.
    """
    from jax.experimental import checkify

    sizes_M = jnp.asarray(np.asarray(head_vocab_sizes), jnp.int32)
    ok = jnp.all((ids_BTM >= 0) & (ids_BTM < sizes_M[None, None, :]))  # [B, T, M]
    checkify.check(
        ok,
        "Engram: a hash id is out of its head's range [0, head_vocab_sizes[m]) (under jit it "
        "would read a zero row); validate ids on the host with validate_hash_ids",
    )


def lookup_rows(
    table_RW: jax.Array,
    ids_BTM: jax.Array,
    offsets_M: np.ndarray | jax.Array,
    lookup_fn: LookupFn | None = None,
    head_vocab_sizes: Sequence[int] | None = None,
) -> jax.Array:
    """Gathers each head's row from the flat table: `table[ids + offset]` (docs/design.md §1.4).

    Out-of-range ids read a zero row rather than a clamped (wrong) row: with `head_vocab_sizes`
    given, an id outside `[0, head_vocab_sizes[m])` is sent past the table end, and the gather uses
    `mode="fill", fill_value=0`. Hosts should still validate ids (`validate_hash_ids`).

    Args:
      table_RW: `[R, W]` flat table of all heads.
      ids_BTM: `[B, T, M]` integer per-head ids.
      offsets_M: `[M]` row offset of each head (`head_offsets`).
      lookup_fn: optional `(table_RW, flat_ids_BTM) -> rows_BTMW`, e.g.
        `sharding.vocab_parallel_lookup(...)`; None uses `jnp.take`.
      head_vocab_sizes: optional `[M]` head sizes for the per-head range mask.

    Returns:
      `[B, T, M, W]` rows in the table's dtype.
    """
    num_rows = table_RW.shape[0]
    ids_BTM = ids_BTM.astype(jnp.int32)
    flat_ids_BTM = ids_BTM + jnp.asarray(offsets_M, jnp.int32)[None, None, :]  # [B, T, M]
    if head_vocab_sizes is not None:
        sizes_M = jnp.asarray(np.asarray(head_vocab_sizes), jnp.int32)
        valid_BTM = (ids_BTM >= 0) & (ids_BTM < sizes_M[None, None, :])
        # Index R is out of bounds for every lookup, so it reads zeros (negative ids would wrap).
        flat_ids_BTM = jnp.where(valid_BTM, flat_ids_BTM, num_rows)
    if lookup_fn is None:
        row_spec = getattr(getattr(jax.typeof(table_RW), "sharding", None), "spec", None)
        if row_spec and row_spec[0] is not None:
            # Explicit mesh axes: a gather from row-sharded operands has no unambiguous sharding.
            raise ValueError(
                f"lookup_rows: table rows are explicitly sharded over {row_spec[0]!r}; plain "
                "jnp.take needs an Auto mesh. Pass "
                "lookup_fn=sharding.vocab_parallel_lookup(mesh, row_axes)"
            )
        # [R, W] take [B, T, M] -> [B, T, M, W]
        return jnp.take(table_RW, flat_ids_BTM, axis=0, mode="fill", fill_value=0)
    return lookup_fn(table_RW, flat_ids_BTM)


def signed_sqrt(x: jax.Array, clamp: float = 1e-6, *, two_way: bool = False) -> jax.Array:
    """`sign(x) * sqrt(max(|x|, clamp))` (docs/design.md §1.5).

    Default: the demo's three-way sign, `sign(0) = 0`, so a zero score maps to exactly 0 (gate
    exactly 0.5) and the gradient there is 0. `two_way=True` is the V4.1 release's `copysign`: the
    clamp floor keeps its sign, so `+0` maps to `+sqrt(clamp)` and `-0` to `-sqrt(clamp)`.
    """
    root = jnp.sqrt(jnp.maximum(jnp.abs(x), clamp))
    if two_way:
        return jnp.copysign(root, x)
    return jnp.sign(x) * root


def engram_gate(query_BTGD: jax.Array, key_BTGD: jax.Array, clamp: float = 1e-6) -> jax.Array:
    """Context-aware gate `sigmoid(signed_sqrt(<q, k> / sqrt(D)))` per token and stream (§1.5).

    Args:
      query_BTGD: `[B, T, G, D]` RMS-normalised hidden states (the query).
      key_BTGD: `[B, T, G, D]` RMS-normalised memory keys.
      clamp: lower clamp of `|score|` inside the square root.

    Returns:
      `[B, T, G]` float32 gates in (0, 1).
    """
    if query_BTGD.shape != key_BTGD.shape or query_BTGD.ndim != 4:
        raise ValueError(
            f"engram_gate: query has shape {query_BTGD.shape} and key {key_BTGD.shape}; "
            "expected equal [B, T, G, D] shapes"
        )
    d = query_BTGD.shape[-1]
    # f32: the gate logit decides how much memory passes; bf16 products lose the sign near the tie.
    q_BTGD = query_BTGD.astype(jnp.float32)
    k_BTGD = key_BTGD.astype(jnp.float32)
    score_BTG = jnp.einsum("btgd,btgd->btg", q_BTGD, k_BTGD) / math.sqrt(d)
    return jax.nn.sigmoid(signed_sqrt(score_BTG, clamp))


def v41_key_value(rows_BTMW: jax.Array, wkv_MWKD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The V4.1 fused projection: rows -> G keys (one per stream) and one shared value.

    Args:
      rows_BTMW: `[B, T, M, W]` gathered table rows (flattened head-major, they are the memory
        `e_t` of M*W values).
      wkv_MWKD: `[M, W, G + 1, D]` the `wkv` kernel viewed per head; slot G is the value.

    Returns:
      `(key_BTGD, value_BTD)` in the promoted dtype of the inputs.
    """
    g = wkv_MWKD.shape[2] - 1
    kv_BTKD = token_einsum("btmw,mwkd->btkd", rows_BTMW, wkv_MWKD)  # [B, T, G + 1, D]
    return kv_BTKD[:, :, :g], kv_BTKD[:, :, g]  # [B, T, G, D], [B, T, D]


def v41_gate(
    hidden_BTGD: jax.Array,
    key_BTGD: jax.Array,
    q_weight_GD: jax.Array,
    k_weight_GD: jax.Array,
    eps: float,
    clamp: float = 1e-6,
) -> jax.Array:
    """The V4.1 gate per token and stream, in float32 (docs/design.md §14).

    `s = <RMSNorm(h; q_weight), RMSNorm(k; k_weight)> / sqrt(D)` with RMS statistics over D (eps
    inside the root), then `sigmoid(copysign(sqrt(max(|s|, clamp)), s))`. This is the demo gate with
    the release's gain names and its two-way sign.

    Args:
      hidden_BTGD: `[B, T, G, D]` the residual streams (the query, not normalised beforehand).
      key_BTGD: `[B, T, G, D]` the keys from `v41_key_value`.
      q_weight_GD, k_weight_GD: `[G, D]` per-stream RMSNorm gains of query and key.
      eps: RMSNorm eps (the checkpoint's RMSNorm eps; `model.engram.qk_norm_eps`).
      clamp: lower clamp of `|s|` inside the square root.

    Returns:
      `[B, T, G]` float32 gates in (0, 1).
    """
    query_BTGD = rms_norm(hidden_BTGD.astype(jnp.float32), q_weight_GD[None, None], eps)
    key_BTGD = rms_norm(key_BTGD.astype(jnp.float32), k_weight_GD[None, None], eps)
    d = hidden_BTGD.shape[-1]
    score_BTG = jnp.einsum(
        "btgd,btgd->btg", query_BTGD.astype(jnp.float32), key_BTGD.astype(jnp.float32)
    ) / math.sqrt(d)
    return jax.nn.sigmoid(signed_sqrt(score_BTG, clamp, two_way=True))


def causal_short_conv(
    x_BTC: jax.Array,
    kernel_KC: jax.Array,
    dilation: int,
    segment_ids_BT: jax.Array | None = None,
) -> jax.Array:
    """Depthwise causal dilated convolution, no bias (docs/design.md §1.6).

    `y[t, c] = sum_i kernel[i, c] * x[t - (K-1-i) * dilation, c]`, zero for negative time, so
    `kernel[K-1]` multiplies the current step (the demo's `w[c, i]` is `kernel[i, c]`, the same tap
    order as a Flax `Conv(padding="CAUSAL")` kernel `[K, 1, C]`).

    Args:
      x_BTC: `[B, T, C]` input.
      kernel_KC: `[K, C]` per-channel taps.
      dilation: spacing between taps (Engram: max n-gram order).
      segment_ids_BT: optional `[B, T]` document ids of packed sequences; a tap reading position
        `t - s` contributes only if `segment_ids[t - s] == segment_ids[t]`, which equals zero
        padding at every document start.

    Returns:
      `[B, T, C]` in the input's dtype (accumulated in float32).
    """
    b, t, c = x_BTC.shape
    k = kernel_KC.shape[0]
    if kernel_KC.shape != (k, c):
        raise ValueError(
            f"causal_short_conv: kernel has shape {kernel_KC.shape}; expected [K, C={c}]"
        )
    if segment_ids_BT is not None and segment_ids_BT.shape != (b, t):
        raise ValueError(
            f"causal_short_conv: segment_ids has shape {segment_ids_BT.shape}; "
            f"expected [B, T]={b, t}"
        )
    x32_BTC = x_BTC.astype(jnp.float32)
    kernel32_KC = kernel_KC.astype(jnp.float32)
    y_BTC = jnp.zeros((b, t, c), jnp.float32)
    # K (= 4) static taps: a shift-and-add per tap, fused by XLA; no unrolled loop over time.
    for i in range(k):
        shift = (k - 1 - i) * dilation
        if shift >= t:
            continue  # the tap only ever reads negative time
        # [B, T - shift, C] padded at the front -> [B, T, C]: x[t - shift]
        shifted_BTC = jnp.pad(x32_BTC[:, : t - shift], ((0, 0), (shift, 0), (0, 0)))
        if segment_ids_BT is not None and shift > 0:
            same_BT = segment_ids_BT[:, : t - shift] == segment_ids_BT[:, shift:]  # [B, T - shift]
            same_BT = jnp.pad(same_BT, ((0, 0), (shift, 0)))  # [B, T], False in the padded front
            shifted_BTC = jnp.where(same_BT[:, :, None], shifted_BTC, 0.0)
        y_BTC = y_BTC + kernel32_KC[i][None, None, :] * shifted_BTC
    return y_BTC.astype(x_BTC.dtype)


def causal_short_conv_step(
    x_BTC: jax.Array, state_BSC: jax.Array, kernel_KC: jax.Array, dilation: int
) -> tuple[jax.Array, jax.Array]:
    """Incremental `causal_short_conv`: continues from the last `S = (K-1)*dilation` inputs.

    Args:
      x_BTC: `[B, T, C]` new inputs (T = 1 for token-by-token decoding; T > 1 for a prefill).
      state_BSC: `[B, S, C]` the previous S inputs, oldest first (zeros before the sequence start).
      kernel_KC: `[K, C]` taps.
      dilation: tap spacing.

    Returns:
      `(y_BTC, new_state_BSC)`: outputs for the new positions and the last S inputs.
    """
    s = state_BSC.shape[1]
    window_BLC = jnp.concatenate([state_BSC.astype(x_BTC.dtype), x_BTC], axis=1)  # [B, S + T, C]
    y_BLC = causal_short_conv(window_BLC, kernel_KC, dilation)
    t = x_BTC.shape[1]
    return y_BLC[:, s:], window_BLC[:, t:]  # [B, T, C], [B, S, C]


def torch_linear_init(fan_in: int) -> Initializer:
    """PyTorch `nn.Linear` default for weight and bias: U(+-1/sqrt(fan_in)) (§1.5)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


# ------------------------------------------------------------------------------------------------
# Module.
# ------------------------------------------------------------------------------------------------


def _is_concrete(x: Any) -> bool:
    if isinstance(x, jax.core.Tracer):
        return False
    if isinstance(x, jax.Array):
        return x.is_fully_addressable
    return True


class Engram(nn.Module):
    """One Engram layer: hashed n-gram memory read by a context gate (docs/design.md §1.4-1.7).

    Returns `Y = V~ + SiLU(conv(RMSNorm(V~)))` (form "demo") or `Y = V~` (form "v41") of shape
    `[B, T, G, D]`; the caller adds it to every residual stream (`h <- h + Engram(h, hash_ids)`,
    §1.7). The parameters below are those of the demo form; `form` lists the V4.1 ones.

    Parameters (logical axes in brackets):
      table `[R, W]` (TABLE_ROWS, MEMORY_WIDTH), R = sum(head_vocab_sizes) rounded up to
        `table_row_multiple`; created only when called with `hash_ids` (the host-offload path passes
        `rows` and keeps the table elsewhere).
      key_kernel `[M*W, G, D]`, key_bias `[G, D]`: G per-stream key projections (one fused kernel,
        equivalent to G separate `nn.Linear`s, §8.1).
      value_kernel `[M*W, D]`, value_bias `[D]`: one value projection shared by all streams.
      key_norm_scale, query_norm_scale, conv_norm_scale `[G, D]`: per-stream RMSNorm gains.
      conv_kernel `[K, G, D]`: depthwise taps; channel `g*D + d` is stream-major (§1.6).

    Decoding (`decode=True`, flax lm1b convention): the first call with `decode=True` on variables
    without a `cache` collection (normally `init`, or `apply(..., mutable=["cache"])` on params
    only) creates a zero cache `cache/conv_state [B, (K-1)*dilation, G*D]` and `cache/index` (int32
    scalar, positions consumed) and computes an ordinary full forward without touching it. Later
    calls with `mutable=["cache"]` continue from the cache: each call's T positions (T = 1 per
    token, or a longer prefill) are appended, so decoding step by step equals the full forward. The
    cache only depends on B and G*D; start a new sequence with a freshly created (zero) cache.

    Attributes:
      head_vocab_sizes: rows per hash head, order-major (the primes of §1.3); M = len.
      max_ngram: largest n-gram order N; M must equal (N - 1) * heads_per_ngram.
      row_width: W = D_head, width of one table row.
      conv_kernel_size: K taps of the short convolution.
      conv_dilation: tap spacing; None means `max_ngram` (§1.6).
      qk_norm_eps: eps of the key and query RMSNorms; default PyTorch's f32 eps as in the demo
        (unverified for the paper's models, docs/design.md §9.6).
      conv_norm_eps: eps of the convolution's RMSNorm.
      gate_clamp: clamp of |score| inside the signed square root.
      conv_zero_init: zero-initialise the conv kernel so that `Y = V~` at init (paper); False uses
        `conv_init`.
      table_init: table initializer; N(0, 1) like the demo's `nn.Embedding`.
      kernel_init: projection weight initializer; None = U(+-1/sqrt(M*W)) like `nn.Linear`.
      bias_init: projection bias initializer; None = U(+-1/sqrt(M*W)) like `nn.Linear`.
      conv_init: conv kernel initializer when not zero-initialised; None = U(+-1/sqrt(K)) (PyTorch
        depthwise Conv1d default).
      table_row_multiple: pad the table's rows up to a multiple of this (e.g. the number of row
        shards); padding rows are never read.
      dtype: compute dtype (norm statistics and the gate always run in float32).
      param_dtype: storage dtype of the dense parameters.
      table_dtype: storage dtype of the table.
      lookup_fn: `(table_RW, flat_ids_BTM) -> rows_BTMW`; None = `jnp.take`. Use
        `sharding.vocab_parallel_lookup` for row-sharded tables.
      decode: incremental decoding with a `cache` collection (see above).
      form: "demo" (the parameters above) or "v41" (the DeepSeek-V4.1 layer: no convolution and no
        cache; parameters `wkv [M*W, G + 1, D]`, `q_weight`, `k_weight [G, D]`, and
        `wkv_bias [G + 1, D]` only with `wkv_bias`; see the module docstring for the checkpoint
        mapping). The conv fields are ignored by "v41"; `qk_norm_eps` is its RMSNorm eps.
      wkv_bias: "v41" only: give `wkv` a bias (the release has none; docs/design.md).
      check_ids: with traced ids, add a `checkify` range check (`check_hash_ids_traced`); the
        caller must wrap the apply in `checkify.checkify`. Concrete ids are always checked.
      heads_per_ngram: K; when given, M must equal (max_ngram - 1) * K, so that ids hashed for
        another max_ngram are refused (M alone cannot tell 16 heads of one order from 8 + 8).
    """

    head_vocab_sizes: Sequence[int]
    max_ngram: int
    row_width: int
    conv_kernel_size: int = 4
    conv_dilation: int | None = None
    qk_norm_eps: float = TORCH_F32_EPS
    conv_norm_eps: float = 1e-5
    gate_clamp: float = 1e-6
    conv_zero_init: bool = True
    table_init: Initializer = nn.initializers.normal(stddev=1.0)
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    conv_init: Initializer | None = None
    table_row_multiple: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    table_dtype: Any = jnp.float32
    lookup_fn: LookupFn | None = None
    decode: bool = False
    form: str = "demo"
    wkv_bias: bool = False
    check_ids: bool = False
    heads_per_ngram: int | None = None

    # -- static properties -------------------------------------------------------------------------

    @property
    def num_heads(self) -> int:
        """M: total hash heads (orders x heads per order)."""
        return len(self.head_vocab_sizes)

    @property
    def dilation(self) -> int:
        """Effective conv dilation (`conv_dilation`, default `max_ngram`)."""
        return self.max_ngram if self.conv_dilation is None else int(self.conv_dilation)

    @property
    def num_table_rows(self) -> int:
        """R: table rows, sum of head sizes rounded up to `table_row_multiple`."""
        total = int(sum(int(p) for p in self.head_vocab_sizes))
        mult = int(self.table_row_multiple)
        return -(-total // mult) * mult

    def _heads_hint(self) -> str:
        orders = self.max_ngram - 1
        if orders > 0 and self.num_heads % orders == 0:
            return f"orders={orders} x heads={self.num_heads // orders}"
        return f"len(head_vocab_sizes)={self.num_heads}"

    def _check_fields(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"Engram: form={self.form!r}; expected one of {FORMS}")
        if self.heads_per_ngram is not None and self.num_heads != (
            (self.max_ngram - 1) * self.heads_per_ngram
        ):
            raise ValueError(
                f"Engram: head_vocab_sizes has {self.num_heads} entries; expected (max_ngram - 1) "
                f"x heads_per_ngram = ({self.max_ngram} - 1) x {self.heads_per_ngram} = "
                f"{(self.max_ngram - 1) * self.heads_per_ngram} (were the ids and sizes hashed "
                "with another max_ngram?)"
            )
        if self.max_ngram < 2:
            raise ValueError(
                f"Engram: max_ngram is {self.max_ngram}; expected >= 2 (bigrams and up)"
            )
        if self.num_heads == 0 or self.num_heads % (self.max_ngram - 1) != 0:
            raise ValueError(
                f"Engram: head_vocab_sizes has {self.num_heads} entries; expected a positive "
                f"multiple of max_ngram - 1 = {self.max_ngram - 1} (orders x heads_per_ngram)"
            )
        if any(int(p) <= 0 for p in self.head_vocab_sizes):
            raise ValueError(
                f"Engram: head_vocab_sizes {list(self.head_vocab_sizes)}; expected positive sizes"
            )
        for name in ("row_width", "conv_kernel_size", "dilation", "table_row_multiple"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Engram: {name} is {getattr(self, name)}; expected >= 1")
        if self.num_table_rows >= 2**31:
            # Flat row ids (hash + head offset) are int32: a larger table would wrap silently.
            raise ValueError(
                f"Engram: the table has {self.num_table_rows} rows (sum of head_vocab_sizes, "
                "padded); expected < 2**31 so that flat row ids fit in int32 (split the memory "
                "over more layers or use smaller tables)"
            )

    def _check_inputs(
        self,
        hidden: jax.Array,
        hash_ids: Any,
        rows: Any,
        segment_ids: Any,
    ) -> None:
        if hidden.ndim != 4:
            raise ValueError(
                f"Engram: hidden has shape {hidden.shape}; expected [B, T, G, D] "
                "(G residual streams; G=1 for a plain residual model)"
            )
        if not jnp.issubdtype(hidden.dtype, jnp.floating):
            raise TypeError(f"Engram: hidden has dtype {hidden.dtype}; expected a float dtype")
        b, t = hidden.shape[:2]
        m, w = self.num_heads, self.row_width
        if (hash_ids is None) == (rows is None):
            raise ValueError(
                "Engram: pass exactly one of hash_ids [B, T, M] and rows [B, T, M, W]; got "
                + ("both" if rows is not None else "neither")
            )
        if hash_ids is not None:
            shape = tuple(np.shape(hash_ids))
            if len(shape) != 3 or shape != (b, t, m):
                raise ValueError(
                    f"Engram: hash_ids has shape {shape}; expected [B, T, M]={(b, t, m)} with "
                    f"M={m} ({self._heads_hint()}) and B, T from hidden {hidden.shape}"
                )
            if not jnp.issubdtype(jnp.result_type(hash_ids), jnp.integer):
                raise TypeError(
                    f"Engram: hash_ids has dtype {jnp.result_type(hash_ids)}; expected int32"
                )
            if _is_concrete(hash_ids):
                validate_hash_ids(hash_ids, self.head_vocab_sizes, name="Engram: hash_ids")
        if rows is not None and tuple(np.shape(rows)) != (b, t, m, w):
            raise ValueError(
                f"Engram: rows has shape {tuple(np.shape(rows))}; expected [B, T, M, W]="
                f"{(b, t, m, w)} (M={m}: {self._heads_hint()}, W=row_width={w})"
            )
        if segment_ids is not None:
            if tuple(np.shape(segment_ids)) != (b, t):
                raise ValueError(
                    f"Engram: segment_ids has shape {tuple(np.shape(segment_ids))}; "
                    f"expected [B, T]={(b, t)}"
                )
            if self.decode:
                raise ValueError(
                    "Engram: segment_ids is not supported with decode=True; decode one document "
                    "per sequence and start it with a fresh cache"
                )

    # -- forward -----------------------------------------------------------------------------------

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        hash_ids: jax.Array | np.ndarray | None = None,
        *,
        rows: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        blocked: jax.Array | None = None,
        return_gates: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Applies the Engram layer.

        Args:
          hidden: `[B, T, G, D]` hidden states (the query); G streams of width D.
          hash_ids: `[B, T, M]` int32 per-head ids in `[0, head_vocab_sizes[m])`, or None when
            `rows` is given. Concrete ids are range-checked on the host; under jit an
            out-of-range id reads a zero row (`check_ids=True` adds a checkify check).
          rows: `[B, T, M, W]` already-gathered table rows (host-offload path), instead of ids.
          segment_ids: optional `[B, T]` document ids; the convolution never mixes documents.
          blocked: optional `[B, T]` bool, True at positions whose memory must not enter the
            streams (image or other non-text tokens, as the V4.1 release masks them): the output
            there is exactly zero. Their hash ids should come from `NgramHasher(...,
            blocked=...)`.
          return_gates: also return the gates.

        Returns:
          `Y [B, T, G, D]` in `dtype` (without the residual), or `(Y, gates [B, T, G] float32)`.

        Raises:
          ValueError, TypeError: on malformed inputs (messages name the argument and expectation).
        """
        self._check_fields()
        self._check_inputs(hidden, hash_ids, rows, segment_ids)
        rows_BTMW = self._read_rows(hash_ids, rows).astype(self.dtype)
        hidden = hidden.astype(self.dtype)
        if self.form == "v41":
            out_BTGD, gate_BTG = self._v41_forward(hidden, rows_BTMW)
        else:
            out_BTGD, gate_BTG = self._demo_forward(hidden, rows_BTMW, segment_ids)
        if blocked is not None:
            if tuple(np.shape(blocked)) != hidden.shape[:2]:
                raise ValueError(
                    f"Engram: blocked has shape {tuple(np.shape(blocked))}; expected [B, T]="
                    f"{hidden.shape[:2]}"
                )
            keep_BT = jnp.logical_not(jnp.asarray(blocked, bool))
            out_BTGD = jnp.where(keep_BT[:, :, None, None], out_BTGD, 0).astype(out_BTGD.dtype)
        out_BTGD = nn.with_logical_constraint(
            out_BTGD, (axes.BATCH, axes.LENGTH, axes.ACT_STREAMS, axes.ACT_EMBED)
        )
        if return_gates:
            return out_BTGD, gate_BTG
        return out_BTGD

    def _read_rows(self, hash_ids: Any, rows: Any) -> jax.Array:
        """Retrieval (§1.4): the table parameter and its lookup, or rows gathered elsewhere.

        The one place the table is read on the device; a storage format that needs decoding (FP8
        rows with block scales) decodes here, through `lookup_rows` / `lookup_fn`.
        """
        if hash_ids is None:
            return jnp.asarray(rows)
        if self.check_ids and not _is_concrete(hash_ids):
            check_hash_ids_traced(jnp.asarray(hash_ids), self.head_vocab_sizes)
        table_RW = self.param(
            "table",
            nn.with_logical_partitioning(self.table_init, (axes.TABLE_ROWS, axes.MEMORY_WIDTH)),
            (self.num_table_rows, self.row_width),
            self.table_dtype,
        )
        return lookup_rows(
            table_RW,
            jnp.asarray(hash_ids),
            head_offsets(self.head_vocab_sizes),
            lookup_fn=self.lookup_fn,
            head_vocab_sizes=self.head_vocab_sizes,
        )

    def _dense(self, name: str, init: Initializer, shape: tuple[int, ...], logical: tuple):
        param = self.param(
            name, nn.with_logical_partitioning(init, logical), shape, self.param_dtype
        )
        return param.astype(self.dtype)

    def _norm_gain(self, name: str, g: int, d: int) -> jax.Array:
        """A per-stream RMSNorm gain `[G, D]`, initialised to one (kept in param_dtype)."""
        return self.param(
            name,
            nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.STREAMS, axes.NORM)),
            (g, d),
            self.param_dtype,
        )

    def _v41_forward(
        self, hidden_BTGD: jax.Array, rows_BTMW: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """V4.1 form: fused `wkv`, per-stream gate, the one gated value added to every stream."""
        _, _, g, d = hidden_BTGD.shape
        m, w = self.num_heads, self.row_width
        proj_init = torch_linear_init(m * w)
        wkv = self._dense(
            "wkv",
            self.kernel_init or proj_init,
            (m * w, g + 1, d),
            (axes.MEMORY_IN, axes.STREAMS, axes.EMBED),
        )
        # [M*W, G + 1, D] -> [M, W, G + 1, D]: contract the rows head by head, no flatten.
        key_BTGD, value_BTD = v41_key_value(rows_BTMW, wkv.reshape(m, w, g + 1, d))
        if self.wkv_bias:
            bias_KD = self._dense(
                "wkv_bias", self.bias_init or proj_init, (g + 1, d), (axes.STREAMS, axes.EMBED)
            )
            key_BTGD = key_BTGD + bias_KD[None, None, :g]
            value_BTD = value_BTD + bias_KD[None, None, g]
        gate_BTG = v41_gate(
            hidden_BTGD,
            key_BTGD,
            self._norm_gain("q_weight", g, d),
            self._norm_gain("k_weight", g, d),
            self.qk_norm_eps,
            self.gate_clamp,
        )
        self.sow("intermediates", "gates", gate_BTG)
        # [B, T, G, 1] * [B, T, 1, D] -> [B, T, G, D]: one shared value scaled per stream.
        out_BTGD = gate_BTG[..., None] * value_BTD.astype(jnp.float32)[:, :, None, :]
        return out_BTGD.astype(self.dtype), gate_BTG

    def _demo_forward(
        self, hidden_BTGD: jax.Array, rows_BTMW: jax.Array, segment_ids: Any
    ) -> tuple[jax.Array, jax.Array]:
        """Demo form (§1.5-1.6): G biased keys, a biased value, the gate, the short convolution."""
        b, t, g, d = hidden_BTGD.shape
        m, w = self.num_heads, self.row_width
        proj_init = torch_linear_init(m * w)
        kernel_init = self.kernel_init or proj_init
        bias_init = self.bias_init or proj_init
        key_kernel = self._dense(
            "key_kernel", kernel_init, (m * w, g, d), (axes.MEMORY_IN, axes.STREAMS, axes.EMBED)
        )
        key_bias = self._dense("key_bias", bias_init, (g, d), (axes.STREAMS, axes.EMBED))
        value_kernel = self._dense(
            "value_kernel", kernel_init, (m * w, d), (axes.MEMORY_IN, axes.EMBED)
        )
        value_bias = self._dense("value_bias", bias_init, (d,), (axes.EMBED,))
        key_scale_GD = self._norm_gain("key_norm_scale", g, d)
        query_scale_GD = self._norm_gain("query_norm_scale", g, d)
        conv_scale_GD = self._norm_gain("conv_norm_scale", g, d)
        k_taps = self.conv_kernel_size
        conv_init = (
            nn.initializers.zeros_init()
            if self.conv_zero_init
            else (self.conv_init or torch_linear_init(k_taps))
        )
        conv_kernel_KGD = self._dense(
            "conv_kernel", conv_init, (k_taps, g, d), (axes.CONV_WIDTH, axes.STREAMS, axes.EMBED)
        )

        # Projections (§1.5): the flat memory e_t is rows flattened head-major, so the [M*W] kernels
        # are viewed as [M, W, ...] to contract rows directly.
        key_kernel_MWGD = key_kernel.reshape(m, w, g, d)  # [M*W, G, D] -> [M, W, G, D]
        value_kernel_MWD = value_kernel.reshape(m, w, d)  # [M*W, D] -> [M, W, D]
        key_BTGD = (
            token_einsum("btmw,mwgd->btgd", rows_BTMW, key_kernel_MWGD) + key_bias[None, None]
        )
        value_BTD = (
            token_einsum("btmw,mwd->btd", rows_BTMW, value_kernel_MWD) + value_bias[None, None]
        )

        # Gate (§1.5): per-stream key/query RMSNorm (f32 statistics), f32 gate logic.
        key_norm_BTGD = rms_norm(key_BTGD, key_scale_GD[None, None], self.qk_norm_eps)
        query_norm_BTGD = rms_norm(hidden_BTGD, query_scale_GD[None, None], self.qk_norm_eps)
        gate_BTG = engram_gate(query_norm_BTGD, key_norm_BTGD, self.gate_clamp)
        self.sow("intermediates", "gates", gate_BTG)
        # [B, T, G, 1] * [B, T, 1, D] -> [B, T, G, D]: one shared value scaled per stream.
        gated_BTGD = (
            gate_BTG[:, :, :, None] * value_BTD.astype(jnp.float32)[:, :, None, :]
        ).astype(self.dtype)

        # Short convolution (§1.6): per-stream RMSNorm, depthwise conv over stream-major channels.
        conv_in_BTGD = rms_norm(gated_BTGD, conv_scale_GD[None, None], self.conv_norm_eps)
        conv_in_BTC = conv_in_BTGD.reshape(b, t, g * d)  # [B, T, G, D] -> [B, T, G*D]
        conv_kernel_KC = conv_kernel_KGD.reshape(k_taps, g * d)  # [K, G, D] -> [K, G*D]
        conv_out_BTC = self._convolve(conv_in_BTC, conv_kernel_KC, segment_ids)
        conv_out_BTGD = nn.silu(conv_out_BTC).reshape(b, t, g, d)  # [B, T, G*D] -> [B, T, G, D]
        return gated_BTGD + conv_out_BTGD, gate_BTG

    def _convolve(
        self, x_BTC: jax.Array, kernel_KC: jax.Array, segment_ids: jax.Array | None
    ) -> jax.Array:
        """The causal conv, reading and updating the decode cache when `decode=True`."""
        if not self.decode:
            seg_BT = None if segment_ids is None else jnp.asarray(segment_ids)
            return causal_short_conv(x_BTC, kernel_KC, self.dilation, seg_BT)
        b, _, c = x_BTC.shape
        s = (self.conv_kernel_size - 1) * self.dilation
        is_initialized = self.has_variable("cache", "conv_state")
        state = self.variable("cache", "conv_state", jnp.zeros, (b, s, c), x_BTC.dtype)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if not is_initialized:
            # Cache creation call (lm1b convention): plain forward, cache left at zeros.
            return causal_short_conv(x_BTC, kernel_KC, self.dilation)
        if state.value.shape != (b, s, c):
            raise ValueError(
                f"Engram: cache conv_state has shape {state.value.shape}; expected "
                f"[B, (K-1)*dilation, G*D]={(b, s, c)} for this input; re-create the cache for "
                "this batch size"
            )
        y_BTC, state.value = causal_short_conv_step(x_BTC, state.value, kernel_KC, self.dilation)
        index.value = index.value + x_BTC.shape[1]
        return y_BTC
