"""Hyper-connections around any sub-layer (residual, HC, mHC, mHC-lite), Sinkhorn and diagnostics.

Orientation, stated once for the whole module (docs/design.md §2.1): every `h_res` array this module
returns or sows is the operator APPLIED to the streams, `out[i] = sum_j h_res[i, j] x[j]` — row
index = output stream. HC stores `A_r` and applies `A_r^T` (§3.1), so its `h_res` is `A_r^T`;
`transpose_res=True` applies a Sinkhorn matrix transposed, as DeepSeek-V4 ports and MaxText do
(§8.2, §8.3), and `h_res` is then that transpose.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import axes
from engram_jax.config import HC_COEFF_INIT_STD
from engram_jax.layers import RMSNorm, rms_norm, token_einsum

Kind = Literal["residual", "hc", "mhc", "mhc_lite", "mhc_v41"]
SinkhornOrder = Literal["row_last", "col_last"]

KINDS = ("residual", "hc", "mhc", "mhc_lite", "mhc_v41")
SINKHORN_ORDERS = ("row_last", "col_last")
# mHC-lite needs n! logits per token (§4): 720 at n = 6 is already far past the practical n <= 4-5.
MAX_LITE_STREAMS = 6
# Stream mixing in true float32: TPU and GPU matmuls at default precision round f32 operands to
# bf16 (or TF32), which would undo the float32 application of the coefficients.
_MIX_PRECISION = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (§2.3)
# --------------------------------------------------------------------------------------------------


def _check_sinkhorn_args(shape: tuple[int, ...], num_iters: int, eps: float, order: str) -> None:
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"sinkhorn: logits has shape {shape}; expected [..., n, n]")
    if not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"sinkhorn: num_iters={num_iters!r}; expected an int >= 1")
    if eps < 0:
        raise ValueError(f"sinkhorn: eps={eps}; expected >= 0")
    if order not in SINKHORN_ORDERS:
        raise ValueError(f"sinkhorn: order={order!r}; expected one of {SINKHORN_ORDERS}")


def _axes_in_order(order: str) -> tuple[int, int]:
    # Axis reduced by each half-step: -2 sums a column (T_c), -1 sums a row (T_r).
    # row_last: M <- T_r(T_c(M)) (paper, §2.3); col_last: M <- T_c(T_r(M)) (§8.2, §8.3).
    return (-2, -1) if order == "row_last" else (-1, -2)


def _log_normalize(log_m: jax.Array, axis: int, eps: float) -> jax.Array:
    """log(M / (sum_axis M + eps)) computed from log M without forming M (no overflow)."""
    peak = jax.lax.stop_gradient(jnp.max(log_m, axis=axis, keepdims=True))
    log_sum = peak + jnp.log(jnp.sum(jnp.exp(log_m - peak), axis=axis, keepdims=True))
    if eps > 0:
        log_sum = jnp.logaddexp(
            log_sum, math.log(eps)
        )  # log(sum + eps), the §2.3 denominator floor
    return log_m - log_sum


def _sinkhorn_log(logits: jax.Array, num_iters: int, eps: float, order: str) -> jax.Array:
    """Log of the Sinkhorn iterate after num_iters full (two-half-step) iterations."""
    first, second = _axes_in_order(order)

    def body(_, log_m):
        return _log_normalize(_log_normalize(log_m, first, eps), second, eps)

    # log M(0) = logits: M(0) = exp(logits) is never formed, so |logits| = 100 cannot overflow.
    return jax.lax.fori_loop(0, num_iters, body, logits)


def _sinkhorn_autodiff(logits: jax.Array, num_iters: int, eps: float, order: str) -> jax.Array:
    return jnp.exp(_sinkhorn_log(logits, num_iters, eps, order))


def _sinkhorn_recompute_fwd(logits, num_iters, eps, order):
    return _sinkhorn_autodiff(logits, num_iters, eps, order), logits


def _sinkhorn_recompute_bwd(num_iters, eps, order, logits, g):
    # Recompute the 2*num_iters normalised iterates P_k = exp(L_k) (held only during this backward
    # pass), then walk back. With L_k = L_{k-1} - log(sum_axis exp(L_{k-1}) + eps):
    #   dL_{k-1} = dL_k - P_k * sum_axis(dL_k)      (holds for any eps >= 0; see module tests)
    first, second = _axes_in_order(order)

    def fwd_body(log_m, _):
        log_c = _log_normalize(log_m, first, eps)
        log_r = _log_normalize(log_c, second, eps)
        return log_r, (jnp.exp(log_c), jnp.exp(log_r))

    _, (p_first_I, p_second_I) = jax.lax.scan(
        fwd_body, logits, None, length=num_iters
    )  # [I, ..., n, n]

    def bwd_body(d_log, p_pair):
        p_first, p_second = p_pair
        d_log = d_log - p_second * jnp.sum(d_log, axis=second, keepdims=True)
        d_log = d_log - p_first * jnp.sum(d_log, axis=first, keepdims=True)
        return d_log, None

    d_last = g * p_second_I[-1]  # d exp(L) / dL = exp(L)
    d_logits, _ = jax.lax.scan(bwd_body, d_last, (p_first_I, p_second_I), reverse=True)
    return (d_logits,)


_sinkhorn_recompute = jax.custom_vjp(_sinkhorn_autodiff, nondiff_argnums=(1, 2, 3))
_sinkhorn_recompute.defvjp(_sinkhorn_recompute_fwd, _sinkhorn_recompute_bwd)


def sinkhorn(
    logits: jax.Array,
    num_iters: int = 20,
    eps: float = 0.0,
    order: SinkhornOrder = "row_last",
    *,
    recompute_grad: bool = True,
) -> jax.Array:
    """Sinkhorn-Knopp projection of logits onto (approximately) doubly stochastic matrices (§2.3).

    Paper preset: `M(0) = exp(logits)`, then `num_iters=20` times `M <- T_r(T_c(M))` (divide every
    column by its sum, then every row), so rows sum to 1 to float32 rounding and columns
    approximately. The iteration runs in log space (`log M <- log M - logsumexp`), the same
    arithmetic without ever forming `exp(logits)`: no overflow or 0/0 at |logits| = 100, where a
    plain exp loop loses whole columns to underflow.

    Everything runs in float32 whatever `logits.dtype` (§9.7: DeepSeek keeps this in fp32; bf16
    Sinkhorn drifts off the manifold), and the result is float32 — callers cast where they mix
    streams.

    Args:
      logits: `[..., n, n]` un-normalised log-weights, any float dtype; n may be 1.
      num_iters: number of full (column+row) iterations, >= 1. Paper: 20.
      eps: added to every denominator, `M / (sum + eps)`. Paper: none (0.0); DeepSeek-V4 / MaxText:
        1e-6.
      order: "row_last" (paper: column then row normalisation, rows exact) or "col_last" (row then
        column, columns exact: the MaxText / DeepSeek-V4 order, §8.2; their softmax start with
        `+eps` is not reproduced bit for bit).
      recompute_grad: use the custom VJP that stores only `logits` and recomputes the iterates in
        the backward pass (default; see BENCHMARKS.md "Hyper-connections"). False gives plain
        autodiff through the `fori_loop`, which stores every iteration's intermediates but also
        supports forward-mode (jvp).

    Returns:
      `[..., n, n]` float32, non-negative.

    Raises:
      ValueError: logits not square in the last two axes, num_iters < 1, eps < 0, an unknown
        order, or (eager calls only) non-finite logits; under jit those give NaN.
    """
    _check_sinkhorn_args(tuple(logits.shape), num_iters, eps, order)
    _check_finite(logits, "sinkhorn")
    logits32 = logits.astype(jnp.float32)  # f32 whatever the input dtype (§2.3, §9.7)
    fn = _sinkhorn_recompute if recompute_grad else _sinkhorn_autodiff
    return fn(logits32, num_iters, float(eps), order)


def _check_finite(logits: jax.Array, name: str) -> None:
    """Refuses NaN or infinite logits when they are concrete (eager calls); under jit they give NaN
    (a Sinkhorn of a non-finite matrix has no meaning), which the tests document."""
    if isinstance(logits, jax.core.Tracer):
        return
    bad = ~np.isfinite(np.asarray(logits, dtype=np.float32))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}: logits{list(where)} = {float(np.asarray(logits)[where])}; expected finite "
            f"values ({int(bad.sum())} non-finite in total)"
        )


def sinkhorn_v41(logits: jax.Array, num_iters: int = 20, eps: float = 1e-6) -> jax.Array:
    """Sinkhorn as DeepSeek-V4 / V4.1 release it (docs/design.md §14, §8.3).

    `M = softmax over each row of logits + eps`, then one column normalisation
    `M / (column sum + eps)`, then `num_iters - 1` times a row normalisation followed by a column
    normalisation (each `M / (sum + eps)`). It ends with a column normalisation: columns sum to one
    to rounding, rows approximately. The softmax bounds every entry, so this runs in plain (not
    log) space, in float32 whatever the input dtype, with plain autodiff (n is small).

    Args:
      logits: `[..., n, n]` float logits; entry `[i, j]` is row i.
      num_iters: 20 in the release; >= 1.
      eps: the release's `hc_eps` 1e-6.

    Returns:
      `[..., n, n]` float32. Under jit, non-finite logits give NaN; eager calls refuse them.
    """
    _check_sinkhorn_args(tuple(logits.shape), num_iters, eps, "col_last")
    _check_finite(logits, "sinkhorn_v41")
    m = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) + eps
    m = m / (jnp.sum(m, axis=-2, keepdims=True) + eps)

    def body(_, m):
        m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)  # rows
        return m / (jnp.sum(m, axis=-2, keepdims=True) + eps)  # columns

    return jax.lax.fori_loop(0, num_iters - 1, body, m)


def initial_pre(batch: int, length: int, n: int) -> jax.Array:
    """The read weights of the first "mhc_v41" site, which has no preceding site: stream 0 alone
    (one-hot, as the release's identity pre-mix).

    The streams start as n copies of the embedding (`expand_streams`), so the first sub-block reads
    the embedding itself (the identity start). `[B, T, G]` float32.
    """
    return jnp.zeros((batch, length, n), jnp.float32).at[:, :, 0].set(1.0)


def collapse_streams(x_BTGD: jax.Array, pre_BTG: jax.Array) -> jax.Array:
    """`sum_i pre[i] x[i]` in float32: the read of a "mhc_v41" site, and the final collapse before
    the LM head with the last site's `pre` (the release ships no separate head coefficients).

    Returns `[B, T, D]` in x's dtype.
    """
    if x_BTGD.ndim != 4 or pre_BTG.shape != x_BTGD.shape[:3]:
        raise ValueError(
            f"collapse_streams: x has shape {x_BTGD.shape} and pre {pre_BTG.shape}; expected "
            "[B, T, G, D] and [B, T, G]"
        )
    out_BTD = jnp.einsum(
        "btg,btgd->btd",
        pre_BTG.astype(jnp.float32),
        x_BTGD.astype(jnp.float32),
        precision=_MIX_PRECISION,
    )
    return out_BTD.astype(x_BTGD.dtype)


def permutation_matrices(n: int) -> np.ndarray:
    """All n! permutation matrices `P_k[i, pi_k(i)] = 1`, identity first (§4): `[n!, n, n]` f32."""
    perms = list(itertools.permutations(range(n)))  # lexicographic: perms[0] is the identity
    p_KGG = np.zeros((len(perms), n, n), np.float32)
    for k, perm in enumerate(perms):
        p_KGG[k, np.arange(n), np.asarray(perm)] = 1.0
    return p_KGG


# --------------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------------


def expand_streams(x_BTD: jax.Array, n: int) -> jax.Array:
    """Copies the embedding output into all n streams (§2.1). `[B, T, D] -> [B, T, G, D]`."""
    if n < 1:
        raise ValueError(f"expand_streams: n={n}; expected >= 1")
    b, t, d = x_BTD.shape
    return jnp.broadcast_to(x_BTD[:, :, None, :], (b, t, n, d))  # [B, T, G, D]


def merge_streams(x_BTGD: jax.Array) -> jax.Array:
    """Sums the streams before the final norm (§2.1), in float32: `[B, T, G, D] -> [B, T, D]`."""
    if x_BTGD.ndim != 4:
        raise ValueError(f"merge_streams: x has shape {x_BTGD.shape}; expected [B, T, G, D]")
    return jnp.sum(x_BTGD, axis=2, dtype=jnp.float32).astype(x_BTGD.dtype)  # [B, T, D]


class Mixing(NamedTuple):
    """Per-token mixing coefficients of one hyper-connection site (float32).

    Attributes:
      h_pre: `[B, T, G]` read weights: layer input = `sum_i h_pre[i] x[i]` (before the pre-norm).
      h_post: `[B, T, G]` write weights: stream i receives `h_post[i] * F(.)`.
      h_res: `[B, T, G, G]` the applied stream mixing, `out[i] = sum_j h_res[i, j] x[j]`.
      res_logits: `[B, T, G, G]` pre-Sinkhorn logits (mhc) or `[B, T, n!]` permutation logits
        (mhc_lite); None for hc and for mhc with n = 1.
    """

    h_pre: jax.Array
    h_post: jax.Array
    h_res: jax.Array
    res_logits: jax.Array | None


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


def _const_init(value: np.ndarray) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        del key
        if tuple(shape) != value.shape:
            raise ValueError(f"init: shape {tuple(shape)} != {value.shape}")
        return jnp.asarray(value, dtype)

    return init


class HyperConnection(nn.Module):
    """One hyper-connection site around a sub-layer F (attention, MLP, MoE, Engram, ...).

    `x_{l+1}[i] = sum_j h_res[i, j] x_l[j] + h_post[i] * F(norm(sum_j h_pre[j] x_l[j]))` (§2.1),
    where `norm` is this module's pre-norm (an `RMSNorm`, parameter collection "norm"); F must not
    normalise again.

    Kinds:
      - "residual": `x + F(norm(x))`, bit for bit the pre-norm residual block. Requires n_streams =
        1 (a residual over several copied streams would only multiply memory; use expand/merge with
        n = 1).
      - "mhc" (§2.2-2.5): coefficients from the whole flattened `[G*D]` state, RMS-normalised after
        the GEMM (§2.4 fused form, exact: the RMSNorm gain is folded into phi, so there is no
        separate gain), `h_pre = sigmoid`, `h_post = 2 sigmoid`, `h_res = sinkhorn` (float32). n =
        1: `h_res = 1` exactly (no Sinkhorn, no res parameters) and scalar read/write gates — a
        residual with gates.
      - "hc" (§3, dynamic HC): per-stream coefficients from the per-stream RMS-normalised state
        (gain folded into the dynamic weights), `tanh`, unconstrained; static init `A_m =
        e_{layer_index mod n}`, `A_r = I`, `B = 1`, dynamic weights `coeff_kernel_init` (the paper:
        0), scalar scales `s_alpha = s_beta = 0.01`. Applied `h_res` is `A_r^T`. n = 1: scalar
        gates `A_m`, `A_r`, `B`; with zero dynamic weights exactly the residual at init.
      - "mhc_lite" (§4): `h_res = sum_k softmax(logits)_k P_k` over all n! permutations, exactly
        doubly stochastic; `h_pre`, `h_post` as mhc. n = 1: one permutation, `h_res = 1`. n > 6 is
        rejected.
      - "mhc_v41" (DeepSeek-V4.1's "single-pass" mHC; docs/design.md §14): the
        mhc coefficients with the release's conventions: `h_pre = sigmoid + sinkhorn_eps`, `h_post
        = 2 sigmoid`, `sinkhorn_v41` (softmax start, column-last), applied transposed (`h_res` is
        `comb^T`). Scheduling: `read(x, pre)` reads with the PRECEDING site's `pre` and returns the
        `h_pre` this site computed from x for the NEXT site; `initial_pre` starts the chain and
        `collapse_streams` with the last site's `h_pre` ends it. `__call__` is refused.

    Initialisation (§2.5, project choices; §9.1 and §9.13 list them unverified, hence fields): phi
    ~ N(0, 0.02^2) (`coeff_kernel_init`, the same default as the trainer's
    `model.hc.coeff_init_std`), alpha = 0.01, `b_res` diagonal `res_diag_bias` and off-diagonal
    `res_offdiag_bias`, `b_pre = -ln(n - 1)` (`pre_bias=None`; 0 for n = 1), `b_post = 0`. The
    paper's phi = 0 (`coeff_kernel_init=nn.initializers.zeros_init()`) has a catch: with equal
    pre/post biases and streams created by `expand_streams`, every stream then stays identical
    forever (inputs, coefficients and gradients are all symmetric in the streams) unless another
    part of the model breaks the symmetry, e.g. Engram's per-stream keys (§1.7). The small random
    phi breaks it and moves the coefficients at init by < 1e-2 (alpha = 0.01 scales it).

    Precision: coefficients are computed in float32, and so is their application: `read` mixes
    the streams with `h_pre` and `write` applies `h_res` and `h_post` in float32 (HIGHEST matmul
    precision), whatever `dtype`; only the results are cast. In bfloat16 the coefficients
    themselves would round (the ~0.999 diagonal of `h_res` at init to 0.998 or 1.0), which biases
    every row sum by ~1e-3 and compounds over depth (~6% over 60 sites).

    Use `__call__(x, sublayer)` or, inside `nn.scan` or custom wiring, `read(x)` then `write(x, y,
    mixing)`.

    Attributes:
      kind: "residual", "hc", "mhc" or "mhc_lite".
      n_streams: G, the number of residual streams (the paper's n; main setting 4).
      layer_index: hyper-connection site index k (attention and FFN count separately); HC reads
        stream k mod n at init.
      sinkhorn_iters, sinkhorn_eps, sinkhorn_order: see `sinkhorn` (paper preset 20, 0.0,
        "row_last").
      sinkhorn_recompute_grad: `sinkhorn`'s `recompute_grad` (custom VJP; False for forward-mode).
      alpha_init: initial value of the learnable scalars alpha_pre/post/res (mhc, mhc_lite). Paper:
        0.01.
      res_diag_bias, res_offdiag_bias: initial `b_res` (mhc). Sinkhorn of these gives diag ~0.999.
      pre_bias: initial `b_pre` (mhc, mhc_lite); None means -ln(n - 1), so h_pre = 1/n.
      post_bias: initial `b_post` (mhc, mhc_lite); 0 gives h_post = 1.
      lite_identity_bias, lite_other_bias: initial permutation logits (mhc_lite, §9.13).
      hc_scale_init: initial s_alpha and s_beta (hc).
      coeff_kernel_init: initialiser of phi (mhc, mhc_lite) and of the dynamic weights (hc);
        default `normal(HC_COEFF_INIT_STD)` = N(0, 0.02^2), as the trainer.
      transpose_res: apply the Sinkhorn / permutation matrix transposed (checkpoint compatibility
        with §8.2 / §8.3 ports); the returned `h_res` is the applied operator either way.
      norm_eps: eps of the pre-norm and of the coefficient RMS statistics.
      sow_mixing: sow `h_pre`, `h_post`, `h_res` (and `res_logits`) into "intermediates" in `read`.
      dtype: dtype of the pre-norm output and of the returned state (the mixing itself runs in
        float32).
      param_dtype: storage dtype of the parameters (coefficients are computed in float32
        regardless).
    """

    kind: Kind = "mhc"
    n_streams: int = 4
    layer_index: int = 0
    sinkhorn_iters: int = 20
    sinkhorn_eps: float = 0.0
    sinkhorn_order: SinkhornOrder = "row_last"
    sinkhorn_recompute_grad: bool = True
    alpha_init: float = 0.01
    res_diag_bias: float = 0.0
    res_offdiag_bias: float = -8.0
    pre_bias: float | None = None
    post_bias: float = 0.0
    lite_identity_bias: float = 0.0
    lite_other_bias: float = -8.0
    hc_scale_init: float = 0.01
    coeff_kernel_init: Callable = nn.initializers.normal(HC_COEFF_INIT_STD)
    transpose_res: bool = False
    norm_eps: float = 1e-6
    sow_mixing: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _validate(self, x_BTGD: jax.Array) -> None:
        name = f"HyperConnection(layer_index={self.layer_index})"
        if self.kind not in KINDS:
            raise ValueError(f"{name}: kind={self.kind!r}; expected one of {KINDS}")
        if not isinstance(self.n_streams, int) or self.n_streams < 1:
            raise ValueError(f"{name}: n_streams={self.n_streams!r}; expected an int >= 1")
        if self.kind == "residual" and self.n_streams != 1:
            raise ValueError(
                f"{name}: kind='residual' with n_streams={self.n_streams}; expected n_streams=1 "
                "(copies of one residual stream only cost memory)"
            )
        if self.kind == "mhc_lite" and self.n_streams > MAX_LITE_STREAMS:
            raise ValueError(
                f"{name}: kind='mhc_lite' with n_streams={self.n_streams}; expected n_streams <= "
                f"{MAX_LITE_STREAMS} (mHC-lite needs n! = {math.factorial(self.n_streams)} "
                "logits per token)"
            )
        if self.kind in ("mhc", "mhc_v41"):
            _check_sinkhorn_args(
                (1, 1), self.sinkhorn_iters, self.sinkhorn_eps, self.sinkhorn_order
            )
        if self.layer_index < 0:
            raise ValueError(f"{name}: layer_index={self.layer_index}; expected >= 0")
        if x_BTGD.ndim != 4 or x_BTGD.shape[2] != self.n_streams:
            raise ValueError(
                f"{name}: x has shape {x_BTGD.shape}; expected [B, T, G, D] with G=n_streams="
                f"{self.n_streams} (use expand_streams)"
            )

    def _param(
        self, name: str, init: Callable, shape: tuple[int, ...], logical: tuple
    ) -> jax.Array:
        return self.param(
            name, nn.with_logical_partitioning(init, logical), shape, self.param_dtype
        )

    def _scalar(self, name: str, value: float) -> jax.Array:
        return self._param(name, nn.initializers.constant(value), (), ()).astype(jnp.float32)

    @nn.compact
    def read(
        self, x_BTGD: jax.Array, pre_BTG: jax.Array | None = None
    ) -> tuple[jax.Array, Mixing | None]:
        """Computes the mixing coefficients and the normalised layer input.

        Args:
          x_BTGD: `[B, T, G, D]` residual streams, G = n_streams.
          pre_BTG: kind "mhc_v41" only (required there): `[B, T, G]` the read weights the
            PRECEDING site produced (`initial_pre` for the first site). This site reads
            `sum_i pre[i] x[i]` with them, and its own `mixing.h_pre` is handed to the next site
            (docs/design.md §14: the scheduling).

        Returns:
          `(layer_input_BTD, mixing)`: the pre-normed input of F, `[B, T, D]` in `dtype`, and a
          `Mixing` (None for kind "residual").

        Raises:
          ValueError: invalid fields or x not `[B, T, n_streams, D]`; `pre_BTG` missing for
            "mhc_v41" or given for another kind.
        """
        self._validate(x_BTGD)
        if (self.kind == "mhc_v41") != (pre_BTG is not None):
            raise ValueError(
                f"HyperConnection(layer_index={self.layer_index}): kind={self.kind!r} with "
                f"pre_BTG {'given' if pre_BTG is not None else 'None'}; expected the preceding "
                "site's read weights [B, T, G] exactly for kind 'mhc_v41'"
            )
        norm = RMSNorm(
            eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
        )
        if self.kind == "residual":
            return norm(x_BTGD[:, :, 0, :]), None  # [B, T, D]
        if self.kind == "hc":
            mixing = self._hc_coefficients(x_BTGD)
        else:
            mixing = self._mhc_coefficients(x_BTGD)
        if self.sow_mixing:
            for field in Mixing._fields:
                value = getattr(mixing, field)
                if value is not None:
                    self.sow("intermediates", field, value)
        if self.kind == "mhc_v41":
            # The read uses the preceding site's weights; mixing.h_pre goes to the next site.
            return norm(collapse_streams(x_BTGD.astype(jnp.float32), pre_BTG)), mixing
        # float32 read; the norm computes in float32 too and casts its output to dtype.
        layer_in_BTD = jnp.einsum(
            "btg,btgd->btd",
            mixing.h_pre.astype(jnp.float32),
            x_BTGD.astype(jnp.float32),
            precision=_MIX_PRECISION,
        )
        return norm(layer_in_BTD), mixing

    def _mhc_coefficients(self, x_BTGD: jax.Array) -> Mixing:
        b, t, g, d = x_BTGD.shape
        lite = self.kind == "mhc_lite"
        v41 = self.kind == "mhc_v41"
        if lite:
            p_KGG = permutation_matrices(g)
            num_res = p_KGG.shape[0]  # n!
        else:
            num_res = g * g if g > 1 else 0  # n = 1: h_res = 1 exactly, no res parameters
        pre_bias = self.pre_bias
        if pre_bias is None:
            pre_bias = -math.log(g - 1) if g > 1 else 0.0  # sigmoid(-ln(n-1)) = 1/n (§2.5)

        # phi = [phi_pre | phi_post | phi_res] as one [G, D, 2G + R] kernel: one GEMM (§2.4).
        phi_pre = self._param(
            "phi_pre", self.coeff_kernel_init, (g, d, g), (axes.STREAMS, axes.EMBED, axes.HC_COEFFS)
        )
        phi_post = self._param(
            "phi_post",
            self.coeff_kernel_init,
            (g, d, g),
            (axes.STREAMS, axes.EMBED, axes.HC_COEFFS),
        )
        kernels = [phi_pre, phi_post]
        if num_res:
            kernels.append(
                self._param(
                    "phi_res",
                    self.coeff_kernel_init,
                    (g, d, num_res),
                    (axes.STREAMS, axes.EMBED, axes.HC_COEFFS),
                )
            )
        phi_GDK = jnp.concatenate([k.astype(jnp.float32) for k in kernels], axis=-1)
        b_pre_G = self._param("b_pre", nn.initializers.constant(pre_bias), (g,), (axes.HC_COEFFS,))
        b_post_G = self._param(
            "b_post", nn.initializers.constant(self.post_bias), (g,), (axes.HC_COEFFS,)
        )
        alpha_pre = self._scalar("alpha_pre", self.alpha_init)
        alpha_post = self._scalar("alpha_post", self.alpha_init)

        # §2.4: H~ = x~ phi on the raw state, then divide by r = rms(x~) over all G*D (float32).
        x32_BTGD = x_BTGD.astype(jnp.float32)
        inv_rms_BT = jax.lax.rsqrt(jnp.mean(jnp.square(x32_BTGD), axis=(2, 3)) + self.norm_eps)
        raw_BTK = token_einsum("btgd,gdk->btk", x32_BTGD, phi_GDK)  # [B, T, 2G + R]
        coeff_BTK = raw_BTK * inv_rms_BT[:, :, None]  # = x' phi with x' = RMSNorm(x~)
        h_pre_BTG = jax.nn.sigmoid(
            alpha_pre * coeff_BTK[..., :g] + b_pre_G.astype(jnp.float32)[None, None, :]
        )
        if v41:
            h_pre_BTG = h_pre_BTG + self.sinkhorn_eps  # the release's pre = sigmoid + eps
        h_post_BTG = 2.0 * jax.nn.sigmoid(
            alpha_post * coeff_BTK[..., g : 2 * g] + b_post_G.astype(jnp.float32)[None, None, :]
        )
        if num_res == 0:
            return Mixing(h_pre_BTG, h_post_BTG, jnp.ones((b, t, 1, 1), jnp.float32), None)

        alpha_res = self._scalar("alpha_res", self.alpha_init)
        if lite:
            b_res_init = np.full((num_res,), self.lite_other_bias, np.float32)
            b_res_init[0] = self.lite_identity_bias  # permutation 0 is the identity
            b_res_R = self._param("b_res", _const_init(b_res_init), (num_res,), (axes.HC_COEFFS,))
            logits_BTR = (
                alpha_res * coeff_BTK[..., 2 * g :] + b_res_R.astype(jnp.float32)[None, None, :]
            )
            weights_BTR = jax.nn.softmax(logits_BTR, axis=-1)  # float32 softmax
            # §4: convex combination of permutation matrices, exactly doubly stochastic.
            h_res_BTGG = jnp.einsum("btk,kij->btij", weights_BTR, jnp.asarray(p_KGG))
            res_logits = logits_BTR
        else:
            # mat: 1 x n^2 -> n x n row-major, entry [i, j] = output stream i, input stream j.
            res_BTGG = coeff_BTK[..., 2 * g :].reshape(b, t, g, g)  # [B, T, G*G] -> [B, T, G, G]
            logits_BTGG, h_res_BTGG = self._sinkhorn_mixing(alpha_res, res_BTGG)
            res_logits = logits_BTGG
        if self.transpose_res or v41:
            h_res_BTGG = jnp.swapaxes(h_res_BTGG, -1, -2)  # [B, T, G(out), G(in)]
        return Mixing(h_pre_BTG, h_post_BTG, h_res_BTGG, res_logits)

    def _sinkhorn_mixing(
        self, alpha_res: jax.Array, res_BTGG: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """mhc / mhc_v41: `(logits, Sinkhorn(logits))`, logits = alpha_res * res + b_res."""
        g = res_BTGG.shape[-1]
        b_res_init = np.full((g, g), self.res_offdiag_bias, np.float32)
        np.fill_diagonal(b_res_init, self.res_diag_bias)
        b_res_GG = self._param(
            "b_res", _const_init(b_res_init), (g, g), (axes.STREAMS, axes.HC_COEFFS)
        )
        logits_BTGG = alpha_res * res_BTGG + b_res_GG.astype(jnp.float32)[None, None]
        if self.kind == "mhc_v41":
            # Released as comb^T x: the caller applies the transpose.
            return logits_BTGG, sinkhorn_v41(logits_BTGG, self.sinkhorn_iters, self.sinkhorn_eps)
        return logits_BTGG, sinkhorn(
            logits_BTGG,
            self.sinkhorn_iters,
            self.sinkhorn_eps,
            self.sinkhorn_order,
            recompute_grad=self.sinkhorn_recompute_grad,
        )

    def _hc_coefficients(self, x_BTGD: jax.Array) -> Mixing:
        _, _, g, d = x_BTGD.shape
        # Static part (§3.3): A_m = e_{k mod n}, B = 1, A_r = I.
        a_m_init = np.zeros((g,), np.float32)
        a_m_init[self.layer_index % g] = 1.0
        static_pre_G = self._param("static_pre", _const_init(a_m_init), (g,), (axes.HC_COEFFS,))
        static_post_G = self._param(
            "static_post", nn.initializers.ones_init(), (g,), (axes.HC_COEFFS,)
        )
        static_res_GG = self._param(
            "static_res",
            _const_init(np.eye(g, dtype=np.float32)),
            (g, g),
            (axes.STREAMS, axes.HC_COEFFS),
        )
        # Dynamic part (§3.2): columns [W_m | W_beta | W_r], one [D, 2 + G] kernel shared by the
        # streams.
        w_DK = self._param(
            "dynamic_kernel", self.coeff_kernel_init, (d, 2 + g), (axes.EMBED, axes.HC_COEFFS)
        )
        s_alpha = self._scalar("s_alpha", self.hc_scale_init)
        s_beta = self._scalar("s_beta", self.hc_scale_init)

        # Per-stream norm over D (the paper uses LayerNorm; RMSNorm here, gain folded into w).
        xbar_BTGD = rms_norm(x_BTGD.astype(jnp.float32), None, self.norm_eps)
        dyn_BTGK = jnp.tanh(token_einsum("btgd,dk->btgk", xbar_BTGD, w_DK.astype(jnp.float32)))
        h_pre_BTG = (
            s_alpha * dyn_BTGK[..., 0] + static_pre_G.astype(jnp.float32)[None, None, :]
        )  # A_m(H)
        h_post_BTG = (
            s_beta * dyn_BTGK[..., 1] + static_post_G.astype(jnp.float32)[None, None, :]
        )  # B(H)
        # A_r(H)[i, :] is predicted from stream i; HC applies A_r^T (§3.1): h_res[j, i] = A_r[i, j].
        a_r_BTGG = s_alpha * dyn_BTGK[..., 2:] + static_res_GG.astype(jnp.float32)[None, None]
        return Mixing(h_pre_BTG, h_post_BTG, jnp.swapaxes(a_r_BTGG, -1, -2), None)

    def write(self, x_BTGD: jax.Array, y_BTD: jax.Array, mixing: Mixing | None) -> jax.Array:
        """Mixes the streams and adds the sub-layer output: `h_res x + h_post^T y` (§2.1).

        Args:
          x_BTGD: `[B, T, G, D]` the same streams passed to `read`.
          y_BTD: `[B, T, D]` the sub-layer output F(layer_input).
          mixing: what `read` returned (None for "residual").

        Returns:
          `[B, T, G, D]` the next residual state, in `dtype` (residual kind: in the promoted input
          dtype).
        """
        if y_BTD.shape != x_BTGD.shape[:2] + x_BTGD.shape[3:]:
            raise ValueError(
                f"HyperConnection.write: y has shape {y_BTD.shape}; expected [B, T, D] = "
                f"{x_BTGD.shape[:2] + x_BTGD.shape[3:]} to match x {x_BTGD.shape}"
            )
        if self.kind == "residual":
            return x_BTGD + y_BTD[:, :, None, :]  # [B, T, 1, D]
        # float32 whatever dtype: bf16 coefficients would bias every row sum (class docstring).
        mixed_BTGD = jnp.einsum(
            "btij,btjd->btid",
            mixing.h_res.astype(jnp.float32),
            x_BTGD.astype(jnp.float32),
            precision=_MIX_PRECISION,
        )
        update_BTGD = (
            mixing.h_post.astype(jnp.float32)[..., None] * y_BTD.astype(jnp.float32)[:, :, None, :]
        )  # [B, T, G, 1] * [B, T, 1, D]
        return (mixed_BTGD + update_BTGD).astype(self.dtype)

    def __call__(self, x_BTGD: jax.Array, sublayer: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """`write(x, sublayer(layer_input), mixing)` after `read(x)`.

        Args:
          x_BTGD: `[B, T, G, D]` residual streams.
          sublayer: F, `[B, T, D] -> [B, T, D]`: any function, or a Flax submodule bound to the
            parent.

        Returns:
          `[B, T, G, D]` the next residual state.
        """
        if self.kind == "mhc_v41":
            raise ValueError(
                "HyperConnection: kind='mhc_v41' hands its read weights to the next site; use "
                "read(x, pre) and write(x, y, mixing) and pass mixing.h_pre on"
            )
        layer_in_BTD, mixing = self.read(x_BTGD)
        return self.write(x_BTGD, sublayer(layer_in_BTD), mixing)


# --------------------------------------------------------------------------------------------------
# Diagnostics (§2.6), pure functions on per-token stacks of mixing matrices
# --------------------------------------------------------------------------------------------------


def mixing_stats(
    h_res_LXGG: jax.Array, res_logits_LXGG: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Per-layer statistics of applied mixing matrices, for logging.

    Args:
      h_res_LXGG: `[L, X, G, G]` applied mixing matrices of L layers for X tokens.
      res_logits_LXGG: optional `[L, X, ...]` pre-Sinkhorn (or permutation) logits.

    Returns:
      dict of `[L]` float32 arrays: `row_sum_err` / `col_sum_err` (max |sum - 1| over tokens),
      `min_col_sum` (min over tokens; attenuation shows here, not in a max), `entropy` (mean over
      tokens and rows of the row entropy of |h_res|/row sum, nats; 0 for a permutation), and with
      logits `logit_spread` (max over tokens of max - min logit: large values mean a saturated,
      dead-gradient Sinkhorn).
    """
    if h_res_LXGG.ndim != 4 or h_res_LXGG.shape[-1] != h_res_LXGG.shape[-2]:
        raise ValueError(f"mixing_stats: h_res has shape {h_res_LXGG.shape}; expected [L, X, G, G]")
    h_LXGG = h_res_LXGG.astype(jnp.float32)
    row_LXG = jnp.sum(h_LXGG, axis=-1)
    col_LXG = jnp.sum(h_LXGG, axis=-2)
    prob_LXGG = jnp.abs(h_LXGG) / jnp.maximum(jnp.sum(jnp.abs(h_LXGG), -1, keepdims=True), 1e-30)
    ent_LXG = -jnp.sum(jnp.where(prob_LXGG > 0, prob_LXGG * jnp.log(prob_LXGG), 0.0), axis=-1)
    stats = {
        "row_sum_err": jnp.max(jnp.abs(row_LXG - 1.0), axis=(1, 2)),
        "col_sum_err": jnp.max(jnp.abs(col_LXG - 1.0), axis=(1, 2)),
        "min_col_sum": jnp.min(col_LXG, axis=(1, 2)),
        "entropy": jnp.mean(ent_LXG, axis=(1, 2)),
    }
    if res_logits_LXGG is not None:
        flat_LXR = res_logits_LXGG.astype(jnp.float32).reshape(*res_logits_LXGG.shape[:2], -1)
        stats["logit_spread"] = jnp.max(jnp.max(flat_LXR, -1) - jnp.min(flat_LXR, -1), axis=1)
    return stats


def amax_gain(h_res_LXGG: jax.Array) -> dict[str, jax.Array]:
    """Amax Gain Magnitude of single layers and of the composite mapping to the top (§2.6).

    The composite from layer l is the operator applied to x_l on its way to x_L:
    `C_l = h_res[L-1] @ ... @ h_res[l]`. Gains are named by that operator: forward = max_i sum_j
    |C[i, j]| (largest absolute row sum: bound on how the signal grows), backward = max_j sum_i
    |C[i, j]| (largest absolute column sum: the gradient goes through C^T). Per token, then
    averaged over tokens.

    Args:
      h_res_LXGG: `[L, X, G, G]` applied mixing matrices, layer 0 first (attention and FFN sites
        count as separate layers).

    Returns:
      dict of `[L]` float32 arrays: `forward`, `backward` (single layer), `composite_forward`,
      `composite_backward` (from layer l to the top), `composite_min_col_sum`.
    """
    if h_res_LXGG.ndim != 4 or h_res_LXGG.shape[-1] != h_res_LXGG.shape[-2]:
        raise ValueError(f"amax_gain: h_res has shape {h_res_LXGG.shape}; expected [L, X, G, G]")
    h_LXGG = h_res_LXGG.astype(jnp.float32)
    _, x, g, _ = h_LXGG.shape

    def step(acc_XGG, h_XGG):
        acc_XGG = jnp.einsum("xij,xjk->xik", acc_XGG, h_XGG)  # C_l = C_{l+1} @ h_l
        return acc_XGG, acc_XGG

    eye_XGG = jnp.broadcast_to(jnp.eye(g, dtype=jnp.float32), (x, g, g))
    _, comp_LXGG = jax.lax.scan(step, eye_XGG, h_LXGG, reverse=True)

    def fwd(m):
        return jnp.mean(jnp.max(jnp.sum(jnp.abs(m), axis=-1), axis=-1), axis=-1)  # [L]

    def bwd(m):
        return jnp.mean(jnp.max(jnp.sum(jnp.abs(m), axis=-2), axis=-1), axis=-1)  # [L]

    return {
        "forward": fwd(h_LXGG),
        "backward": bwd(h_LXGG),
        "composite_forward": fwd(comp_LXGG),
        "composite_backward": bwd(comp_LXGG),
        "composite_min_col_sum": jnp.mean(jnp.min(jnp.sum(comp_LXGG, axis=-2), axis=-1), axis=-1),
    }
