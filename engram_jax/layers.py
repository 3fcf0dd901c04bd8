"""Small shared layers: RMSNorm (pure function and module) and the per-token projection."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import axes


def token_einsum(spec: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, kernel)` for a per-token projection `"bt...,...->bt..."`, computed with
    the batch and length axes merged into one token axis (a free reshape).

    Why: XLA:CPU runs the weight gradient of a projection whose input is `[B, T, D]` (a dot that
    contracts two axes, B and T) 1.5-2.5x slower than the same gradient over `[B*T, D]`, e.g.
    153 ms against 61 ms for a 4096-word LM head at B*T = 2048 (`engram_jax.bench.token_axis`,
    BENCHMARKS.md); on TPU and GPU the reshape is free. The values are the einsum's to float
    rounding (XLA may block the longer contraction differently).

    Args:
      spec: an einsum whose first operand and output both start with "bt", e.g. "btd,dnh->btnh".
      x: `[B, T, ...]`.
      kernel: the projection.

    Returns:
      `[B, T, ...]` as the spec's output.
    """
    inputs, out = spec.split("->")
    x_spec, kernel_spec = inputs.split(",")
    if not (x_spec.startswith("bt") and out.startswith("bt")):
        raise ValueError(f"token_einsum: spec {spec!r} must map 'bt...' to 'bt...'")
    token = next(c for c in "zyxwvu" if c not in spec)  # a letter the spec does not use
    b, t = x.shape[:2]
    y = jnp.einsum(
        f"{token}{x_spec[2:]},{kernel_spec}->{token}{out[2:]}",
        x.reshape(b * t, *x.shape[2:]),
        kernel,
    )  # [B*T, ...]
    return y.reshape(b, t, *y.shape[1:])  # [B, T, ...]


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm over the last axis: `x / sqrt(mean(x^2) + eps) * scale`.

    Statistics run in float32 whatever the input dtype (a bf16 mean of squares loses too much
    precision); the result is cast back to the input dtype.

    Args:
      x: `[..., D]`.
      scale: `[D]` gain (or one of x's rank that broadcasts against it), or None for no gain.
      eps: added to the mean square.
    """
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    y = x32 * inv_rms
    if scale is not None:
        scale = scale.astype(jnp.float32)
        if scale.ndim == 1:
            scale = scale.reshape((1,) * (y.ndim - 1) + (-1,))  # [D] -> [1, ..., 1, D]
        y = y * scale
    return y.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain initialised to one.

    Attributes:
      eps: added to the mean square.
      dtype: output dtype (None keeps the input's).
      param_dtype: dtype of the gain.
      scale_axis: logical axis name of the gain, for sharding rules.
    """

    eps: float = 1e-6
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    scale_axis: str = axes.NORM

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (self.scale_axis,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        y = rms_norm(x, scale, self.eps)
        return y if self.dtype is None else y.astype(self.dtype)
