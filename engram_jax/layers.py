"""Small shared layers: RMSNorm (pure function and module)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import axes


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
