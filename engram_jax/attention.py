"""Causal self-attention: RoPE, grouped-query attention, DeepSeek MLA, KV cache.

Shape suffixes follow the notation of docs/design.md, plus L = a low-rank latent width (MLA). In
MLA names, H is the per-head width of whichever part the name says (`q_nope_BTNH` has
qk_nope_head_dim, `v_BSNH` has v_head_dim).

Decode protocol (both modules, flax lm1b style, variables in the `cache` collection):

1. Create the cache by applying the module with `decode=True` to a full-length input
   `[B, max_len, D]` while the cache does not exist yet, e.g.
   `variables = model.init(rng, x_BSD, positions_BS)`, or without computing anything,
   `shapes = jax.eval_shape(model.init, rng, x_BSD, positions_BS)["cache"]` then
   `cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)`.
   That call runs the ordinary causal forward pass and creates zero caches of length `max_len`
   with `cache_index = 0`; it writes nothing into them.
2. Apply with `mutable=["cache"]` on chunks `x_BTD` (T = 1 for token-by-token decoding, or T > 1
   to prefill): the chunk's keys (or MLA latents) are written at slots
   `[cache_index, cache_index + T)`, query t sees slots `<= cache_index + t`, and `cache_index`
   advances by T. Slots beyond that are masked out.
   The caller passes the RoPE positions explicitly and must keep `cache_index + T <= max_len`
   (writes past the end are clamped by `lax.dynamic_update_slice`, not detected). All batch rows
   share one `cache_index`; `segment_ids` are not accepted in decode steps (one sequence per row).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import axes
from engram_jax.layers import rms_norm, token_einsum

Initializer = Callable[..., jax.Array]


# --------------------------------------------------------------------------------------------------
# RoPE (pure functions).
# --------------------------------------------------------------------------------------------------


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Rotary inverse frequencies `theta^(-2i / head_dim)` for i in [0, head_dim / 2), float32.

    Args:
      head_dim: number of rotated features; must be even and positive.
      theta: RoPE base (10000 in RoFormer/Llama).

    Returns:
      `[head_dim // 2]` float32.

    Raises:
      ValueError: head_dim odd or non-positive, or theta non-positive.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope_frequencies: head_dim={head_dim}; expected a positive even integer")
    if theta <= 0:
        raise ValueError(f"rope_frequencies: theta={theta}; expected > 0")
    exponents_F = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim  # [H/2]
    return 1.0 / (jnp.float32(theta) ** exponents_F)


def apply_rope(
    x_BTNH: jax.Array, positions_BT: jax.Array, theta: float, rope_dim: int | None = None
) -> jax.Array:
    """Rotary position embedding, rotate-half layout (GPT-NeoX / Llama / Gemma convention).

    Feature i is paired with feature i + rope_dim / 2 (not with i + 1 as in the interleaved
    layout), and the pair is rotated by angle `position * theta^(-2i / rope_dim)`. Only the first
    `rope_dim` features rotate; the rest pass through. Angles, sin/cos and the rotation run in
    float32 (bf16 angles lose whole radians at long positions); the result is cast back to x's
    dtype. Positions are explicit, so packed documents can restart at 0 and decode steps can
    continue from any offset.

    Args:
      x_BTNH: `[B, T, N, H]` queries or keys (N may be 1 for a head-shared key).
      positions_BT: `[B, T]` integer positions.
      theta: RoPE base.
      rope_dim: number of leading features of H to rotate (even, <= H); None rotates all H.

    Returns:
      `[B, T, N, H]`, same dtype as x_BTNH.

    Raises:
      ValueError: wrong ranks, mismatched [B, T], or a bad rope_dim.
      TypeError: non-integer positions.
    """
    if x_BTNH.ndim != 4:
        raise ValueError(f"apply_rope: x has shape {x_BTNH.shape}; expected [B, T, N, H]")
    b, t, _, h = x_BTNH.shape
    if positions_BT.shape != (b, t):
        raise ValueError(
            f"apply_rope: positions has shape {positions_BT.shape}; "
            f"expected [B, T] = {(b, t)} from x"
        )
    if not jnp.issubdtype(positions_BT.dtype, jnp.integer):
        raise TypeError(
            f"apply_rope: positions has dtype {positions_BT.dtype}; expected an integer"
        )
    rope_dim = h if rope_dim is None else rope_dim
    if rope_dim <= 0 or rope_dim % 2 or rope_dim > h:
        raise ValueError(f"apply_rope: rope_dim={rope_dim}; expected an even integer in (0, H={h}]")
    half = rope_dim // 2
    inv_freq_F = rope_frequencies(rope_dim, theta)  # [rope_dim / 2]
    angles_BTF = positions_BT.astype(jnp.float32)[:, :, None] * inv_freq_F[None, None, :]
    sin_BT1F = jnp.sin(angles_BTF)[:, :, None, :]  # [B, T, 1, rope_dim / 2]
    cos_BT1F = jnp.cos(angles_BTF)[:, :, None, :]
    x32_BTNH = x_BTNH.astype(jnp.float32)
    first_BTNF = x32_BTNH[..., :half]
    second_BTNF = x32_BTNH[..., half:rope_dim]
    rotated_BTNH = jnp.concatenate(
        [
            first_BTNF * cos_BT1F - second_BTNF * sin_BT1F,
            second_BTNF * cos_BT1F + first_BTNF * sin_BT1F,
            x32_BTNH[..., rope_dim:],
        ],
        axis=-1,
    )
    return rotated_BTNH.astype(x_BTNH.dtype)


# --------------------------------------------------------------------------------------------------
# Masks and the attention core (pure functions).
# --------------------------------------------------------------------------------------------------


def segment_mask(segment_ids_BT: jax.Array) -> jax.Array:
    """Same-document mask for packed rows: `[B, 1, T, T]`, True where query and key share an id.

    Combine with causality (`is_causal=True`). Padding (id 0 by convention) is just another
    segment: padding tokens attend to each other, which keeps their softmax finite; the loss masks
    them out.

    Args:
      segment_ids_BT: `[B, T]` integer segment ids.
    """
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]  # [B, T, T]
    return same_BTS[:, None, :, :]  # [B, 1, T, T]


def cache_mask(cache_index: jax.Array, num_queries: int, cache_len: int) -> jax.Array:
    """Decode mask `[1, 1, T, S]`: query t (at slot cache_index + t) sees slots <= cache_index + t.

    Args:
      cache_index: int32 scalar, first slot written by this chunk.
      num_queries: T, tokens in this chunk.
      cache_len: S, the cache length.
    """
    query_slot_T = cache_index + jnp.arange(num_queries, dtype=jnp.int32)  # [T]
    key_slot_S = jnp.arange(cache_len, dtype=jnp.int32)  # [S]
    visible_TS = key_slot_S[None, :] <= query_slot_T[:, None]  # [T, S]
    return visible_TS[None, None, :, :]  # [1, 1, T, S]


def attend(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKV: jax.Array,
    *,
    scale: float,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    implementation: str | None = None,
) -> jax.Array:
    """Softmax attention through `jax.nn.dot_product_attention` (fused kernels where available).

    Logits and softmax run in float32 inside dot_product_attention whatever the input dtype. Query
    head n reads key/value head `n // (N // K)` (GQA groups are contiguous). dot_product_attention
    needs values as wide as keys, so when the value width V differs from H (MLA), the narrower side
    is zero-padded: padded value columns are sliced off the output, and zero-padded query/key
    columns add nothing to the logits.

    Args:
      q_BTNH: `[B, T, N, H]` queries.
      k_BSKH: `[B, S, K, H]` keys; N % K == 0.
      v_BSKV: `[B, S, K, V]` values.
      scale: logit multiplier (1 / sqrt(H) for standard attention).
      mask: optional boolean mask broadcastable to `[B, N, T, S]`, True = attend.
      is_causal: also apply the causal mask (query t sees keys <= t; use only when T == S).
      implementation: passed to dot_product_attention (None, "xla" or "cudnn").

    Returns:
      `[B, T, N, V]` in the dtype of q.
    """
    h, v = q_BTNH.shape[-1], v_BSKV.shape[-1]
    width = max(h, v)
    if h < width:
        pad_h = [(0, 0)] * 3 + [(0, width - h)]
        q_BTNH, k_BSKH = jnp.pad(q_BTNH, pad_h), jnp.pad(k_BSKH, pad_h)  # [..., max(H, V)]
    if v < width:
        v_BSKV = jnp.pad(v_BSKV, [(0, 0)] * 3 + [(0, width - v)])  # [B, S, K, max(H, V)]
    out_BTNW = jax.nn.dot_product_attention(
        q_BTNH,
        k_BSKH,
        v_BSKV,
        mask=mask,
        scale=scale,
        is_causal=is_causal,
        implementation=implementation,
    )
    return out_BTNW[..., :v]  # [B, T, N, V]


# --------------------------------------------------------------------------------------------------
# Shared module helpers.
# --------------------------------------------------------------------------------------------------


def _fan_in_init(in_axis: int | tuple[int, ...], out_axis: int | tuple[int, ...]) -> Initializer:
    """Truncated-normal init with variance 1/fan_in; in_axis are the kernel's contracted axes."""
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
    )


def _check_inputs(
    name: str, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None
) -> None:
    """Trace-time shape/dtype checks shared by both modules."""
    if x_BTD.ndim != 3:
        raise ValueError(f"{name}: x has shape {x_BTD.shape}; expected [B, T, D] (rank 3)")
    b, t, _ = x_BTD.shape
    if positions_BT.shape != (b, t):
        raise ValueError(
            f"{name}: positions has shape {positions_BT.shape}; expected [B, T] = {(b, t)} from x"
        )
    if not jnp.issubdtype(positions_BT.dtype, jnp.integer):
        raise TypeError(f"{name}: positions has dtype {positions_BT.dtype}; expected an integer")
    if segment_ids_BT is not None and segment_ids_BT.shape != (b, t):
        raise ValueError(
            f"{name}: segment_ids has shape {segment_ids_BT.shape}; "
            f"expected [B, T] = {(b, t)} from x"
        )


def _scaled_rms_norm(x: jax.Array, scale_H: jax.Array, eps: float) -> jax.Array:
    """rms_norm over the last axis, gain reshaped to x's rank (implicit rank promotion fails)."""
    return rms_norm(x, scale_H.reshape((1,) * (x.ndim - 1) + scale_H.shape), eps)


class _Cache:
    """The `cache` collection variables of one module: named buffers plus `cache_index`."""

    def __init__(self, module: nn.Module, shapes: dict[str, tuple[int, ...]], dtype: jnp.dtype):
        first = next(iter(shapes))
        self.is_initialized = module.has_variable("cache", first)
        self.buffers = {
            name: module.variable("cache", name, jnp.zeros, shape, dtype)
            for name, shape in shapes.items()
        }
        self.index = module.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))

    def length(self) -> int:
        return next(iter(self.buffers.values())).value.shape[1]

    def write(self, chunks: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Write `[B, T, ...]` chunks at slot cache_index, advance it, return the full buffers."""
        index = self.index.value
        full = {}
        for name, chunk in chunks.items():
            buffer = self.buffers[name]
            start = (0, index) + (0,) * (chunk.ndim - 2)
            buffer.value = jax.lax.dynamic_update_slice(
                buffer.value, chunk.astype(buffer.value.dtype), start
            )
            full[name] = buffer.value
        self.index.value = index + next(iter(chunks.values())).shape[1]
        return full


def _check_decode_chunk(
    name: str, num_queries: int, cache_len: int, segment_ids: jax.Array | None
) -> None:
    """Decode-step checks that are static at trace time."""
    if num_queries > cache_len:
        raise ValueError(
            f"{name}: decode chunk has T={num_queries} tokens; the cache holds max_len={cache_len}"
        )
    if segment_ids is not None:
        raise ValueError(
            f"{name}: segment_ids must be None in decode steps (one sequence per batch row)"
        )


# --------------------------------------------------------------------------------------------------
# Grouped-query attention.
# --------------------------------------------------------------------------------------------------


def _module_kernel(module: nn.Module, name: str, shape, names, in_axis, out_axis) -> jax.Array:
    """A projection kernel of `module`: its `kernel_init`, else fan-in scaled over `in_axis`,
    partitioned over the logical axes `names`."""
    init = module.kernel_init or _fan_in_init(in_axis, out_axis)
    return module.param(name, nn.with_logical_partitioning(init, names), shape, module.param_dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE, optional QK-norm and a KV cache.

    Parameters (D = model width, N = num_heads, K = num_kv_heads, H = head_dim; no biases):
      query: `[D, N, H]`  (EMBED, HEADS, HEAD_DIM)
      key:   `[D, K, H]`  (EMBED, KV_HEADS, HEAD_DIM)
      value: `[D, K, H]`  (EMBED, KV_HEADS, HEAD_DIM)
      out:   `[N, H, D]`  (HEADS, HEAD_DIM, EMBED)
      query_norm, key_norm: `[H]` (NORM), only when use_qk_norm.
    Total: `2*D*N*H + 2*D*K*H (+ 2*H)`.

    Cache (decode=True, protocol in the module docstring): cached_key, cached_value
    `[B, S, K, H]` in `dtype` (keys stored after QK-norm and RoPE), cache_index int32 scalar.

    Attributes:
      num_heads: N, query heads.
      num_kv_heads: K, key/value heads; must divide num_heads (K == N is MHA, K == 1 is MQA).
      head_dim: H, even (RoPE pairs features).
      rope_theta: RoPE base.
      use_qk_norm: RMSNorm over H on each query and key head (learned gain), before RoPE.
      qk_norm_eps: epsilon of that RMSNorm.
      dtype: compute dtype (float32 or bfloat16); softmax and norms run in float32 regardless.
      param_dtype: parameter storage dtype.
      decode: use and update the KV cache.
      kernel_init: initializer for all four kernels; None = truncated normal with variance
        1/fan_in, where fan_in is D for query/key/value and N*H for out.
      attention_impl: `implementation` of jax.nn.dot_product_attention (None, "xla" or "cudnn").
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    use_qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    decode: bool = False
    kernel_init: Initializer | None = None
    attention_impl: str | None = None

    def _validate_fields(self) -> None:
        for field in ("num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"Attention.{field}={getattr(self, field)}; expected > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"Attention.num_kv_heads={self.num_kv_heads} does not divide "
                f"num_heads={self.num_heads}; grouped-query attention needs "
                "num_heads % num_kv_heads == 0"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"Attention.head_dim={self.head_dim}; expected even (RoPE pairs features)"
            )

    def _kernel(self, name: str, shape, names, in_axis, out_axis) -> jax.Array:
        return _module_kernel(self, name, shape, names, in_axis, out_axis)

    def _project(self, x_BTD: jax.Array, positions_BT: jax.Array):
        """Queries [B, T, N, H], keys and values [B, T, K, H] (QK-normed and rotated) and the
        output kernel [N, H, D], in `dtype`."""
        d = x_BTD.shape[-1]
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        q_kernel_DNH = self._kernel(
            "query", (d, n, h), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), 0, (1, 2)
        )
        k_kernel_DKH = self._kernel(
            "key", (d, k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), 0, (1, 2)
        )
        v_kernel_DKH = self._kernel(
            "value", (d, k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), 0, (1, 2)
        )
        out_kernel_NHD = self._kernel(
            "out", (n, h, d), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), (0, 1), 2
        )
        x_BTD, q_kernel_DNH, k_kernel_DKH, v_kernel_DKH, out_kernel_NHD = nn.dtypes.promote_dtype(
            x_BTD, q_kernel_DNH, k_kernel_DKH, v_kernel_DKH, out_kernel_NHD, dtype=self.dtype
        )

        q_BTNH = token_einsum("btd,dnh->btnh", x_BTD, q_kernel_DNH)
        k_BTKH = token_einsum("btd,dkh->btkh", x_BTD, k_kernel_DKH)
        v_BTKH = token_einsum("btd,dkh->btkh", x_BTD, v_kernel_DKH)

        if self.use_qk_norm:
            # QK-norm (f32 statistics inside rms_norm) bounds logit growth; applied before RoPE.
            norm_init = nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,))
            q_scale_H = self.param("query_norm", norm_init, (h,), self.param_dtype)
            k_scale_H = self.param("key_norm", norm_init, (h,), self.param_dtype)
            q_BTNH = _scaled_rms_norm(q_BTNH, q_scale_H, self.qk_norm_eps)
            k_BTKH = _scaled_rms_norm(k_BTKH, k_scale_H, self.qk_norm_eps)

        q_BTNH = apply_rope(q_BTNH, positions_BT, self.rope_theta)
        k_BTKH = apply_rope(k_BTKH, positions_BT, self.rope_theta)
        q_BTNH = nn.with_logical_constraint(q_BTNH, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
        k_BTKH = nn.with_logical_constraint(
            k_BTKH, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None)
        )
        v_BTKH = nn.with_logical_constraint(
            v_BTKH, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None)
        )
        return q_BTNH, k_BTKH, v_BTKH, out_kernel_NHD

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
    ) -> jax.Array:
        """Attend causally over x (or over the cache in decode mode).

        Args:
          x_BTD: `[B, T, D]` inputs.
          positions_BT: `[B, T]` integer RoPE positions (restarting at 0 per packed document).
          segment_ids_BT: optional `[B, T]` integer document ids; tokens attend only within
            their segment. Must be None in decode steps.

        Returns:
          `[B, T, D]` in `dtype`.

        Raises:
          ValueError: bad fields or shapes (the message names the field or argument).
          TypeError: non-integer positions.
        """
        self._validate_fields()
        _check_inputs("Attention", x_BTD, positions_BT, segment_ids_BT)
        b, t, _ = x_BTD.shape
        k, h = self.num_kv_heads, self.head_dim
        q_BTNH, k_BTKH, v_BTKH, out_kernel_NHD = self._project(x_BTD, positions_BT)

        scale = 1.0 / math.sqrt(h)
        cache = None
        if self.decode:
            cache = _Cache(
                self, {"cached_key": (b, t, k, h), "cached_value": (b, t, k, h)}, self.dtype
            )
        if cache is not None and cache.is_initialized:
            s = cache.length()
            _check_decode_chunk("Attention", t, s, segment_ids_BT)
            mask_11TS = cache_mask(cache.index.value, t, s)
            full = cache.write({"cached_key": k_BTKH, "cached_value": v_BTKH})
            out_BTNH = attend(
                q_BTNH,
                full["cached_key"],  # [B, S, K, H]
                full["cached_value"],  # [B, S, K, H]
                scale=scale,
                mask=mask_11TS,
                implementation=self.attention_impl,
            )
        else:
            mask_B1TT = None if segment_ids_BT is None else segment_mask(segment_ids_BT)
            out_BTNH = attend(
                q_BTNH,
                k_BTKH,
                v_BTKH,
                scale=scale,
                mask=mask_B1TT,
                is_causal=True,
                implementation=self.attention_impl,
            )

        y_BTD = token_einsum("btnh,nhd->btd", out_BTNH, out_kernel_NHD)
        return nn.with_logical_constraint(y_BTD, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))


# --------------------------------------------------------------------------------------------------
# Multi-head latent attention (DeepSeek-V2 §2.1, V3 §2.1.1).
# --------------------------------------------------------------------------------------------------


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention (MLA) with a latent KV cache.

    Equations (DeepSeek-V2 §2.1.2-2.1.3; RMSNorm on both latents as in V3 §2.1.1), h = input:
      c_Q = RMSNorm(W_DQ h),  q^C = W_UQ c_Q (per head, qk_nope_head_dim),
                              q^R = RoPE(W_QR c_Q) (per head, qk_rope_head_dim)
        (without query compression, q_lora_rank in {0, None}: [q^C; q^R] = W_Q h)
      c_KV = RMSNorm(W_DKV h) (kv_lora_rank),  k^C = W_UK c_KV,  v^C = W_UV c_KV  (per head)
      k^R = RoPE(W_KR h) (qk_rope_head_dim, one key shared by all heads)
      q_i = [q^C_i; q^R_i],  k_i = [k^C_i; k^R],
      o_i = softmax(q_i . k_i / sqrt(qk_nope_head_dim + qk_rope_head_dim)) v^C_i,
      u = W_O [o_1; ...; o_N].

    Parameters (D = model width, N = num_heads, Lq = q_lora_rank, L = kv_lora_rank,
    Hn = qk_nope_head_dim, Hr = qk_rope_head_dim, Hv = v_head_dim; no biases):
      with query compression: q_down `[D, Lq]` (EMBED, LATENT), q_norm `[Lq]` (NORM),
                              q_up `[Lq, N, Hn + Hr]` (LATENT, HEADS, HEAD_DIM) (W_UQ; W_QR)
      without:                q `[D, N, Hn + Hr]` (EMBED, HEADS, HEAD_DIM)
      kv_down `[D, L]` (EMBED, LATENT), kv_norm `[L]` (NORM), k_rope `[D, Hr]` (EMBED, HEAD_DIM),
      k_up `[L, N, Hn]` (LATENT, HEADS, HEAD_DIM), v_up `[L, N, Hv]` (LATENT, HEADS, HEAD_DIM),
      out `[N, Hv, D]` (HEADS, HEAD_DIM, EMBED).
    In each per-head query kernel the last axis is [nope features; rope features].

    Cache (decode=True, protocol in the module docstring): cached_latent `[B, S, L]` (c_KV after
    its RMSNorm) and cached_key_rope `[B, S, Hr]` (k^R after RoPE), both in `dtype`, plus
    cache_index. Decode steps re-expand keys and values from the latent (the non-absorbed form:
    simple and exact; weight absorption would save FLOPs at long contexts).

    Attributes:
      num_heads: N.
      q_lora_rank: Lq; 0 or None disables query compression.
      kv_lora_rank: L, width of the cached latent c_KV.
      qk_nope_head_dim: Hn, per-head query/key width without RoPE.
      qk_rope_head_dim: Hr, decoupled RoPE width (even).
      v_head_dim: Hv, per-head value width.
      rope_theta: RoPE base.
      norm_eps: epsilon of the latent RMSNorms.
      dtype: compute dtype; softmax and norms run in float32 regardless.
      param_dtype: parameter storage dtype.
      decode: use and update the latent cache.
      kernel_init: initializer for all kernels; None = truncated normal with variance 1/fan_in.
      attention_impl: `implementation` of jax.nn.dot_product_attention.
    """

    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    decode: bool = False
    kernel_init: Initializer | None = None
    attention_impl: str | None = None

    def _validate_fields(self) -> None:
        name = "MultiHeadLatentAttention"
        for field in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{name}.{field}={getattr(self, field)}; expected > 0")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            raise ValueError(
                f"{name}.qk_rope_head_dim={self.qk_rope_head_dim}; expected a positive even integer"
            )
        if self.q_lora_rank is not None and self.q_lora_rank < 0:
            raise ValueError(f"{name}.q_lora_rank={self.q_lora_rank}; expected None, 0 or > 0")

    def _kernel(self, name: str, shape, names, in_axis, out_axis) -> jax.Array:
        return _module_kernel(self, name, shape, names, in_axis, out_axis)

    def _norm_scale(self, name: str, width: int) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,))
        return self.param(name, init, (width,), self.param_dtype)

    def _queries(self, x_BTD: jax.Array) -> jax.Array:
        """[B, T, N, Hn + Hr] queries, before RoPE: compressed (W_DQ -> RMSNorm -> W_UQ/W_QR)
        or direct (W_Q)."""
        d = x_BTD.shape[-1]
        n, hq = self.num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim
        heads = (axes.HEADS, axes.HEAD_DIM)
        if self.q_lora_rank:
            lq = self.q_lora_rank
            q_down_DL = self._kernel("q_down", (d, lq), (axes.EMBED, axes.LATENT), 0, 1)
            q_norm_L = self._norm_scale("q_norm", lq)
            q_up_LNH = self._kernel("q_up", (lq, n, hq), (axes.LATENT, *heads), 0, (1, 2))
            x_BTD, q_down_DL, q_up_LNH = nn.dtypes.promote_dtype(
                x_BTD, q_down_DL, q_up_LNH, dtype=self.dtype
            )
            c_q_BTL = jnp.einsum("btd,dl->btl", x_BTD, q_down_DL)  # [B, T, Lq]
            c_q_BTL = _scaled_rms_norm(c_q_BTL, q_norm_L, self.norm_eps)
            q_BTNH = jnp.einsum("btl,lnh->btnh", c_q_BTL, q_up_LNH)  # [B, T, N, Hn + Hr]
        else:
            q_DNH = self._kernel("q", (d, n, hq), (axes.EMBED, *heads), 0, (1, 2))
            x_BTD, q_DNH = nn.dtypes.promote_dtype(x_BTD, q_DNH, dtype=self.dtype)
            q_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD, q_DNH)  # [B, T, N, Hn + Hr]
        return q_BTNH

    def _keys_source(self, latent_BTL, k_rope_BTH, segment_ids_BT):
        """The latents [B, S, L] and shared rotated keys [B, S, Hr] attended over (the cache
        after this chunk in decode steps, else this call's, S = T), with their mask."""
        b, t, lkv = latent_BTL.shape
        hr = self.qk_rope_head_dim
        cache = None
        if self.decode:
            cache = _Cache(
                self, {"cached_latent": (b, t, lkv), "cached_key_rope": (b, t, hr)}, self.dtype
            )
        if cache is not None and cache.is_initialized:
            s = cache.length()
            _check_decode_chunk("MultiHeadLatentAttention", t, s, segment_ids_BT)
            mask = cache_mask(cache.index.value, t, s)  # [1, 1, T, S]
            full = cache.write({"cached_latent": latent_BTL, "cached_key_rope": k_rope_BTH})
            latent_BSL, k_rope_BSH = full["cached_latent"], full["cached_key_rope"]
            is_causal = False
        else:
            latent_BSL, k_rope_BSH = latent_BTL, k_rope_BTH  # S = T
            mask = None if segment_ids_BT is None else segment_mask(segment_ids_BT)
            is_causal = True
        return latent_BSL, k_rope_BSH, mask, is_causal

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
    ) -> jax.Array:
        """Attend causally over x (or over the latent cache in decode mode); arguments, result
        and errors as `Attention.__call__`."""
        self._validate_fields()
        _check_inputs("MultiHeadLatentAttention", x_BTD, positions_BT, segment_ids_BT)
        b, t, d = x_BTD.shape
        n, lkv = self.num_heads, self.kv_lora_rank
        hn, hr, hv = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        hq = hn + hr
        heads = (axes.HEADS, axes.HEAD_DIM)

        q_BTNH = self._queries(x_BTD)  # [B, T, N, Hn + Hr]

        kv_down_DL = self._kernel("kv_down", (d, lkv), (axes.EMBED, axes.LATENT), 0, 1)
        kv_norm_L = self._norm_scale("kv_norm", lkv)
        k_rope_DH = self._kernel("k_rope", (d, hr), (axes.EMBED, axes.HEAD_DIM), 0, 1)
        k_up_LNH = self._kernel("k_up", (lkv, n, hn), (axes.LATENT, *heads), 0, (1, 2))
        v_up_LNH = self._kernel("v_up", (lkv, n, hv), (axes.LATENT, *heads), 0, (1, 2))
        out_NHD = self._kernel("out", (n, hv, d), (*heads, axes.EMBED), (0, 1), 2)
        x_BTD, kv_down_DL, k_rope_DH, k_up_LNH, v_up_LNH, out_NHD = nn.dtypes.promote_dtype(
            x_BTD, kv_down_DL, k_rope_DH, k_up_LNH, v_up_LNH, out_NHD, dtype=self.dtype
        )

        # Decoupled RoPE (V2 §2.1.3): rotate only each query head's rope part and one shared key.
        q_nope_BTNH = q_BTNH[..., :hn]  # [B, T, N, Hn]
        q_rope_BTNH = apply_rope(q_BTNH[..., hn:], positions_BT, self.rope_theta)  # [B, T, N, Hr]
        q_BTNH = jnp.concatenate([q_nope_BTNH, q_rope_BTNH], axis=-1)  # [B, T, N, Hn + Hr]

        latent_BTL = jnp.einsum("btd,dl->btl", x_BTD, kv_down_DL)  # [B, T, L]
        latent_BTL = _scaled_rms_norm(latent_BTL, kv_norm_L, self.norm_eps)  # c_KV
        k_rope_BTH = jnp.einsum("btd,dh->bth", x_BTD, k_rope_DH)  # W_KR h, [B, T, Hr]
        k_rope_BT1H = k_rope_BTH[:, :, None, :]  # [B, T, 1, Hr]
        k_rope_BTH = apply_rope(k_rope_BT1H, positions_BT, self.rope_theta)[:, :, 0, :]

        scale = 1.0 / math.sqrt(hq)
        latent_BSL, k_rope_BSH, mask, is_causal = self._keys_source(
            latent_BTL, k_rope_BTH, segment_ids_BT
        )
        s = latent_BSL.shape[1]
        k_nope_BSNH = jnp.einsum("bsl,lnh->bsnh", latent_BSL, k_up_LNH)  # k^C, [B, S, N, Hn]
        v_BSNH = jnp.einsum("bsl,lnh->bsnh", latent_BSL, v_up_LNH)  # v^C, [B, S, N, Hv]
        k_rope_BSNH = jnp.broadcast_to(k_rope_BSH[:, :, None, :], (b, s, n, hr))  # shared k^R
        k_BSNH = jnp.concatenate([k_nope_BSNH, k_rope_BSNH], axis=-1)  # [B, S, N, Hn + Hr]
        q_BTNH = nn.with_logical_constraint(q_BTNH, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
        k_BSNH = nn.with_logical_constraint(k_BSNH, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
        v_BSNH = nn.with_logical_constraint(v_BSNH, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))

        out_BTNH = attend(
            q_BTNH,
            k_BSNH,
            v_BSNH,
            scale=scale,
            mask=mask,
            is_causal=is_causal,
            implementation=self.attention_impl,
        )  # [B, T, N, Hv]
        y_BTD = jnp.einsum("btnh,nhd->btd", out_BTNH, out_NHD)
        return nn.with_logical_constraint(y_BTD, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
