"""AltUp (alternating updates): K blocks of width D on a widened residual, one computed per layer.

docs/design.md "AltUp". Per layer, with streams `x = [x_1 .. x_K]` (`[B, T, K, D]`):

1. predict: `x_hat = P x` (every block from all blocks),
2. compute: the ordinary pre-norm residual layer runs on the active block, `x_tilde = L(x_hat_j)`,
3. correct: `x_i <- x_hat_i + c_i (x_tilde - x_hat_j)`.

Coefficients are either the AltUp paper's static scalars (`P` a learned `[K, K]`, `c` a learned
`[K]`) or Gemma 3n's dynamic ones, computed per token from a router
`m(z) = tanh(W_router (RMSNorm(z) / D))`: `P = I + C_pred(m(x_j))` and `c = C_corr(m(x_tilde)) + 1`.
The first block of the input is the token embedding; the others are learned projections of it
rescaled to its RMS, and at the output the other blocks are projected back (rescaled to the RMS of
block 0) and all K are averaged (Gemma 3n). Every coefficient is float32 and so is its
application, as in `mhc.py`.

The linear map a layer applies to the residual (leaving out the computed update) is the
prediction operator, so `predict` sows it as `h_res` for the same Amax-gain diagnostics as the
hyper-connections (`model.mixing_matrices`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import axes

Coefficients = Literal["static", "dynamic"]
COEFFICIENTS = ("static", "dynamic")
# Floor of the mean square when rescaling a projected block to a target RMS (Gemma 3n's 1e-5).
RESCALE_EPS = 1e-5
_PRECISION = jax.lax.Precision.HIGHEST


def active_block(layer: int, num_blocks: int, active: int) -> int:
    """The block layer `layer` computes on: `layer mod K` when `active == -1`, else `active`."""
    if active == -1:
        return layer % num_blocks
    if not 0 <= active < num_blocks:
        raise ValueError(f"active_block: active={active}; expected -1 or in [0, {num_blocks})")
    return active


# --------------------------------------------------------------------------------------------------
# Pure functions (float32 in, float32 out).
# --------------------------------------------------------------------------------------------------


def predict(x_BTKD: jax.Array, p_BTKK: jax.Array) -> jax.Array:
    """`x_hat_i = sum_j p[i, j] x_j`; `p` is `[K, K]` (static) or per token `[B, T, K, K]`."""
    if p_BTKK.ndim == 2:
        return jnp.einsum("ij,btjd->btid", p_BTKK, x_BTKD, precision=_PRECISION)  # [B, T, K, D]
    return jnp.einsum("btij,btjd->btid", p_BTKK, x_BTKD, precision=_PRECISION)  # [B, T, K, D]


def correct(
    x_hat_BTKD: jax.Array, computed_BTD: jax.Array, c_BTK: jax.Array, active: int
) -> jax.Array:
    """`x_i <- x_hat_i + c_i (computed - x_hat_active)`; `c` is `[K]` or per token `[B, T, K]`."""
    innovation_BTD = computed_BTD - x_hat_BTKD[:, :, active]
    if c_BTK.ndim == 1:
        c_BTK = c_BTK[None, None, :]  # [1, 1, K]
    return x_hat_BTKD + c_BTK[..., None] * innovation_BTD[:, :, None, :]  # [B, T, K, D]


def router_modalities(
    z_BTD: jax.Array, norm_scale_D: jax.Array, router_DK: jax.Array, eps: float
) -> jax.Array:
    """Gemma 3n's router `m(z) = tanh(W_router (RMSNorm(z) / D))`, `[B, T, D] -> [B, T, K]`."""
    z32 = z_BTD.astype(jnp.float32)
    normed_BTD = z32 * jax.lax.rsqrt(jnp.mean(jnp.square(z32), -1, keepdims=True) + eps)
    normed_BTD = normed_BTD * norm_scale_D.astype(jnp.float32)[None, None, :] / z_BTD.shape[-1]
    return jnp.tanh(normed_BTD @ router_DK.astype(jnp.float32))  # [B, T, K]


def rescale_to(x_BTD: jax.Array, target_BTD: jax.Array) -> jax.Array:
    """`x` scaled per token to the RMS of `target` (Gemma 3n's stream magnitudes)."""
    target_rms = jnp.sqrt(jnp.mean(jnp.square(target_BTD), -1, keepdims=True))
    rms = jnp.sqrt(jnp.maximum(jnp.mean(jnp.square(x_BTD), -1, keepdims=True), RESCALE_EPS))
    return x_BTD * target_rms / rms


def clip_forward(w: jax.Array, clip: float) -> jax.Array:
    """`clip(w, -clip, clip)` in the forward pass with the identity's gradient (0: no clip).

    Gemma 3n clamps the stored weights in place during training; here the stored value is left
    alone and only the value used is clipped, so a weight past the bound keeps its gradient.
    """
    if clip <= 0:
        return w
    return w + jax.lax.stop_gradient(jnp.clip(w, -clip, clip) - w)


# --------------------------------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------------------------------


def _kernel(module: nn.Module, name: str, init: Callable, shape: tuple, logical: tuple, dtype):
    return module.param(name, nn.with_logical_partitioning(init, logical), shape, dtype)


def _eye_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.eye(shape[0], dtype=dtype)


class AltUp(nn.Module):
    """Predict and correct of one layer; the caller computes the layer on the active block.

    Use `x_hat, active_in = predict(x)`, run the layer on `active_in [B, T, 1, D]`, then
    `correct(x_hat, layer_output [B, T, D])`.

    Parameters (K = num_blocks):
      static:  `prediction [K, K]` (init I), `correction [K]` (init 1).
      dynamic: `router_norm [D]` (init 1), `router [D, K]` (init `router_init`),
               `prediction [K, K*K]` and `correction [K, K]` (init 0: at init `P = I`, `c = 1`).
    Either way the layer starts as a residual on every block: all blocks receive the active
    block's update.

    Attributes:
      num_blocks: K.
      hidden_size: D.
      layer: this layer's index (chooses the active block when `active == -1`).
      active: -1 (alternate: layer mod K) or a fixed block.
      coefficients: "static" (AltUp paper) or "dynamic" (Gemma 3n).
      coef_clip: dynamic only: bound of the C_pred / C_corr weights (0: none).
      router_init: initializer of the router kernel.
      norm_eps: eps of the router's RMSNorm.
      sow_mixing: sow the prediction operator as `h_res [B, T, K, K]` into "intermediates".
      dtype: dtype of the returned streams.
      param_dtype: storage dtype of the parameters (used in float32).
    """

    num_blocks: int
    hidden_size: int
    layer: int = 0
    active: int = 0
    coefficients: Coefficients = "dynamic"
    coef_clip: float = 120.0
    router_init: Callable = nn.initializers.normal(0.02)
    norm_eps: float = 1e-6
    sow_mixing: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        if self.coefficients not in COEFFICIENTS:
            raise ValueError(
                f"AltUp.coefficients: got {self.coefficients!r}; expected one of {COEFFICIENTS}"
            )
        k, d, dtype = self.num_blocks, self.hidden_size, self.param_dtype
        self.active_index = active_block(self.layer, k, self.active)
        if self.coefficients == "static":
            self.prediction = _kernel(
                self, "prediction", _eye_init, (k, k), (axes.STREAMS, axes.HC_COEFFS), dtype
            )
            self.correction = _kernel(
                self, "correction", nn.initializers.ones_init(), (k,), (axes.HC_COEFFS,), dtype
            )
            return
        zeros = nn.initializers.zeros_init()
        self.router_norm = _kernel(
            self, "router_norm", nn.initializers.ones_init(), (d,), (axes.NORM,), dtype
        )
        self.router = _kernel(
            self, "router", self.router_init, (d, k), (axes.EMBED, axes.HC_COEFFS), dtype
        )
        self.prediction = _kernel(
            self, "prediction", zeros, (k, k * k), (axes.STREAMS, axes.HC_COEFFS), dtype
        )
        self.correction = _kernel(
            self, "correction", zeros, (k, k), (axes.STREAMS, axes.HC_COEFFS), dtype
        )

    def _modalities(self, z_BTD: jax.Array) -> jax.Array:
        return router_modalities(z_BTD, self.router_norm, self.router, self.norm_eps)

    def predict(self, x_BTKD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`(x_hat [B, T, K, D] float32, active block of x_hat [B, T, 1, D] in dtype)`."""
        k, j = self.num_blocks, self.active_index
        if x_BTKD.ndim != 4 or x_BTKD.shape[2:] != (k, self.hidden_size):
            raise ValueError(
                f"AltUp: x has shape {x_BTKD.shape}; expected [B, T, K, D] with K=num_blocks="
                f"{k}, D=hidden_size={self.hidden_size}"
            )
        b, t = x_BTKD.shape[:2]
        x32_BTKD = x_BTKD.astype(jnp.float32)
        if self.coefficients == "static":
            h_res = self.prediction.astype(jnp.float32)  # [K, K]
        else:
            c_pred = clip_forward(self.prediction.astype(jnp.float32), self.coef_clip)
            modalities_BTK = self._modalities(x32_BTKD[:, :, j])
            # Row i of the K x K block: the weights of x_j in x_hat_i (Gemma 3n's layout).
            coefs_BTKK = (modalities_BTK @ c_pred).reshape(b, t, k, k)  # [B, T, K*K] -> K x K
            h_res = coefs_BTKK + jnp.eye(k, dtype=jnp.float32)[None, None]  # x_hat = x + C x
        x_hat_BTKD = predict(x32_BTKD, h_res)
        if self.sow_mixing:
            self.sow("intermediates", "h_res", jnp.broadcast_to(h_res, (b, t, k, k)))
        return x_hat_BTKD, x_hat_BTKD[:, :, j : j + 1].astype(self.dtype)

    def correct(self, x_hat_BTKD: jax.Array, computed_BTD: jax.Array) -> jax.Array:
        """The next streams `[B, T, K, D]` in `dtype` from `predict`'s `x_hat` and the layer's
        output on the active block."""
        computed32_BTD = computed_BTD.astype(jnp.float32)
        if self.coefficients == "static":
            c = self.correction.astype(jnp.float32)  # [K]
        else:
            c_corr = clip_forward(self.correction.astype(jnp.float32), self.coef_clip)
            c = self._modalities(computed32_BTD) @ c_corr + 1.0  # [B, T, K]
        return correct(x_hat_BTKD, computed32_BTD, c, self.active_index).astype(self.dtype)


class AltUpStreams(nn.Module):
    """The widened residual's ends: `expand` builds K blocks from the embedding (block 0 is the
    embedding, block i a learned projection `[D, D]` of it rescaled to its RMS), `merge` projects
    blocks 1..K-1 back (rescaled to block 0's RMS) and averages all K. K = 1 is the identity.

    Parameters: `expand_proj [K-1, D, D]`, `merge_proj [K-1, D, D]` (absent for K = 1).
    """

    num_blocks: int
    hidden_size: int
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        if self.num_blocks == 1:
            return

        def init(key, shape, dtype):
            keys = jax.random.split(key, shape[0])
            return jax.vmap(lambda k: self.kernel_init(k, shape[1:], dtype))(keys)

        logical = (axes.STREAMS, axes.EMBED, None)
        shape = (self.num_blocks - 1, self.hidden_size, self.hidden_size)
        self.expand_proj = _kernel(self, "expand_proj", init, shape, logical, self.param_dtype)
        self.merge_proj = _kernel(self, "merge_proj", init, shape, logical, self.param_dtype)

    def expand(self, x_BTD: jax.Array) -> jax.Array:
        """`[B, T, D] -> [B, T, K, D]`."""
        if self.num_blocks == 1:
            return x_BTD[:, :, None, :]
        x32_BTD = x_BTD.astype(jnp.float32)
        proj_KDE = self.expand_proj.astype(jnp.float32)
        extra_BTKD = jnp.einsum("btd,kde->btke", x32_BTD, proj_KDE, precision=_PRECISION)
        extra_BTKD = rescale_to(extra_BTKD, x32_BTD[:, :, None, :])
        return jnp.concatenate([x32_BTD[:, :, None, :], extra_BTKD], axis=2).astype(self.dtype)

    def merge(self, x_BTKD: jax.Array) -> jax.Array:
        """`[B, T, K, D] -> [B, T, D]`."""
        if self.num_blocks == 1:
            return x_BTKD[:, :, 0]
        x32_BTKD = x_BTKD.astype(jnp.float32)
        proj_KDE = self.merge_proj.astype(jnp.float32)
        back_BTKD = jnp.einsum("btkd,kde->btke", x32_BTKD[:, :, 1:], proj_KDE, precision=_PRECISION)
        back_BTKD = rescale_to(back_BTKD, x32_BTKD[:, :, :1])
        merged_BTD = jnp.mean(jnp.concatenate([x32_BTKD[:, :, :1], back_BTKD], axis=2), axis=2)
        return merged_BTD.astype(self.dtype)
