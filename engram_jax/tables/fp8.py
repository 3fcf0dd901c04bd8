"""FP8 table rows: `float8_e4m3fn` values with one `float8_e8m0fnu` (power-of-two) scale per 32
values, the storage of DeepSeek-V4.1's released Engram tables, packed as one byte row.

Packed row layout (every placement, the row files and the converted checkpoint use it): a row of
width W is `W + W / 32` bytes, the W E4M3 values first, then the W / 32 E8M0 scale exponents (256
wide: 256 + 8 = 264 bytes, against 1024 in float32). Value `j` of a row decodes to
`float(e4m3[j]) * 2 ** (e8m0[j // 32] - 127)`, exactly representable in float32, so every
placement that decodes the same bytes gets bit-identical rows.

Scale rounding (as the release's quantization kernels do): a block's scale is its largest
magnitude divided by the E4M3 maximum 448, rounded *up* to a power of two, so no value saturates
(`|x| / scale <= 448`); the magnitude is floored at 1e-4 first, which gives an all-zero block a
small finite scale (its values stay exact zeros). Rounding up costs at most one bit of E4M3 range;
rounding to nearest would clip the largest values of half the blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

BLOCK = 32  # values per scale
E4M3_MAX = 448.0
# Largest magnitudes below this floor share its scale (an all-zero block gets a finite one).
AMAX_FLOOR = 1e-4
VALUE_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
SCALE_DTYPE = np.dtype(ml_dtypes.float8_e8m0fnu)
PACKED_DTYPE = np.dtype(np.uint8)
NAME = "fp8"  # the `table_dtype` value that selects FP8 rows


def check_width(width: int, where: str = "fp8 rows") -> None:
    """Raises ValueError unless `width` is a positive multiple of the 32-value scale block."""
    if width <= 0 or width % BLOCK:
        raise ValueError(
            f"{where}: row width {width} is not a positive multiple of {BLOCK}; FP8 rows keep "
            f"one scale per {BLOCK} values"
        )


def packed_width(width: int) -> int:
    """Bytes of one packed row of `width` values (256 -> 264)."""
    check_width(width)
    return width + width // BLOCK


def row_width(packed: int) -> int:
    """Values per row of a packed row of `packed` bytes (264 -> 256); the inverse of
    `packed_width`."""
    width = packed * BLOCK // (BLOCK + 1)
    if width <= 0 or packed_width(width) != packed:
        raise ValueError(
            f"fp8 rows: {packed} bytes per row is no packed FP8 row (W + W/{BLOCK} bytes with W "
            f"a multiple of {BLOCK})"
        )
    return width


def quantize(rows_XW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(values [X, W] e4m3fn, scales [X, W/32] e8m0fnu)` of float rows (module docstring)."""
    rows_XW = np.asarray(rows_XW, np.float32)
    num, width = rows_XW.shape
    check_width(width)
    blocks_XSB = rows_XW.reshape(num, width // BLOCK, BLOCK)  # [X, S, 32]
    amax_XS = np.maximum(np.abs(blocks_XSB).max(axis=-1), AMAX_FLOOR)  # [X, S]
    # frexp: amax/448 = m * 2**e with m in [0.5, 1); the smallest 2**k >= it is 2**(e - 1) when
    # m == 0.5 exactly (a power of two), 2**e otherwise.
    mantissa_XS, exponent_XS = np.frexp(amax_XS / np.float32(E4M3_MAX))
    exponent_XS = exponent_XS - (mantissa_XS == 0.5)
    scale_XS = np.ldexp(np.float32(1.0), exponent_XS).astype(np.float32)  # [X, S]
    values_XSB = blocks_XSB / scale_XS[..., None]  # exact: division by a power of two
    values_XW = values_XSB.reshape(num, width).astype(VALUE_DTYPE)  # round to nearest even
    return values_XW, scale_XS.astype(SCALE_DTYPE)


def pack(values_XW: np.ndarray, scales_XS: np.ndarray) -> np.ndarray:
    """`[X, W + W/32]` uint8 packed rows of E4M3 values and E8M0 scales."""
    return np.concatenate(
        [values_XW.view(PACKED_DTYPE), scales_XS.view(PACKED_DTYPE)], axis=-1
    )  # [X, W + S]


def unpack(packed_XP: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(values [..., W] e4m3fn, scales [..., W/32] e8m0fnu)` views of packed rows."""
    packed_XP = np.asarray(packed_XP, PACKED_DTYPE)
    width = row_width(packed_XP.shape[-1])
    return packed_XP[..., :width].view(VALUE_DTYPE), packed_XP[..., width:].view(SCALE_DTYPE)


def encode(rows_XW: np.ndarray) -> np.ndarray:
    """Float rows `[X, W]` -> packed FP8 rows `[X, W + W/32]` uint8."""
    return pack(*quantize(rows_XW))


def decode(packed_XP: np.ndarray) -> np.ndarray:
    """Packed FP8 rows `[..., W + W/32]` uint8 -> float32 rows `[..., W]` (numpy)."""
    values, scales = unpack(packed_XP)
    width = values.shape[-1]
    values_XSB = values.astype(np.float32).reshape(*values.shape[:-1], width // BLOCK, BLOCK)
    return (values_XSB * scales.astype(np.float32)[..., None]).reshape(values.shape)


def decode_jax(packed_XP: jax.Array) -> jax.Array:
    """`decode` on the device: packed uint8 rows `[..., W + W/32]` -> float32 `[..., W]`, for rows
    gathered from a device table of packed rows."""
    width = row_width(packed_XP.shape[-1])
    lead = packed_XP.shape[:-1]
    values = jax.lax.bitcast_convert_type(packed_XP[..., :width], jnp.float8_e4m3fn)
    scales = jax.lax.bitcast_convert_type(packed_XP[..., width:], jnp.float8_e8m0fnu)
    values_XSB = values.astype(jnp.float32).reshape(*lead, width // BLOCK, BLOCK)  # [..., S, 32]
    return (values_XSB * scales.astype(jnp.float32)[..., None]).reshape(*lead, width)


def is_packed(dtype: np.dtype | str) -> bool:
    """Whether a stored table of this dtype holds packed FP8 rows (uint8)."""
    return np.dtype(dtype) == PACKED_DTYPE
