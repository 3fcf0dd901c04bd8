"""FP8 table rows (tables/fp8.py) against a float64 reference written from the format's definition:
E4M3 (bias 7, 3 mantissa bits, no infinities, max 448) times a power-of-two scale per 32 values,
the scale the block's amax / 448 rounded up to a power of two."""

import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.tables import fp8


def e4m3_grid() -> np.ndarray:
    """Every finite non-negative E4M3 value, from the bit layout (no library float8 type)."""
    values = [m / 8 * 2.0**-6 for m in range(8)]  # subnormals: exponent field 0
    for e in range(1, 16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # S.1111.111 is NaN
            values.append((1 + m / 8) * 2.0 ** (e - 7))
    return np.array(values)


def reference_encode(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(decoded rows [X, W], scales [X, W/32])` in float64: nearest grid value (ties: even
    mantissa), times the scale."""
    grid = e4m3_grid()
    x = rows.astype(np.float64).reshape(rows.shape[0], -1, 32)
    amax = np.maximum(np.abs(x).max(-1), 1e-4)
    scale = 2.0 ** np.ceil(np.log2(amax / 448.0))
    y = np.abs(x / scale[..., None])
    dist = np.abs(y[..., None] - grid)  # [X, S, 32, G]
    best = dist.min(-1, keepdims=True)
    ties = dist == best
    # Among equally near grid values, the one with an even 3-bit mantissa (grid index i holds
    # mantissa i % 8).
    even = np.arange(grid.size) % 2 == 0
    pick = np.where(ties.sum(-1) > 1, np.argmax(ties & even, -1), np.argmax(ties, -1))
    q = np.sign(x) * grid[pick]
    return (q * scale[..., None]).reshape(rows.shape), scale


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(64, 256)).astype(np.float32)
    rows *= np.exp(rng.uniform(-12, 12, size=(64, 1))).astype(np.float32)  # wide dynamic range
    rows[3] = 0.0  # a zero row
    rows[5, :32] = 0.0  # a zero block
    rows[7, 40] = 448.0 * 2.0**-3  # amax/448 exactly a power of two
    rows[9, ::7] = -rows[9, ::7]
    return rows


def test_packed_layout_is_264_bytes_for_256_values(rows):
    packed = fp8.encode(rows)
    assert packed.shape == (64, 264) and packed.dtype == np.uint8
    assert fp8.packed_width(256) == 264 and fp8.row_width(264) == 256


def test_decode_matches_reference(rows):
    decoded = fp8.decode(fp8.encode(rows))
    expected, _ = reference_encode(rows)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded.astype(np.float64), expected)


def test_scales_are_exact_powers_of_two_rounded_up(rows):
    _, scales = fp8.unpack(fp8.encode(rows))
    scale = scales.astype(np.float64)
    exponent = np.log2(scale)
    np.testing.assert_array_equal(exponent, np.round(exponent))
    _, expected = reference_encode(rows)
    np.testing.assert_array_equal(scale, expected)
    # Nothing saturates: every block's largest value fits under 448 after scaling.
    amax = np.abs(rows.astype(np.float64).reshape(64, 8, 32)).max(-1)
    assert np.all(amax / scale <= 448.0)


def test_round_trip_error_bound(rows):
    decoded = fp8.decode(fp8.encode(rows)).astype(np.float64)
    _, scales = fp8.unpack(fp8.encode(rows))
    scale = np.repeat(scales.astype(np.float64), 32, axis=-1)
    x = rows.astype(np.float64)
    # Normal E4M3 values: half an ulp of 3 mantissa bits is 2^-4 relative; subnormals (below
    # 2^-6 after scaling): half their spacing 2^-9, i.e. 2^-10 absolute.
    bound = np.maximum(np.abs(x) * 2.0**-4, scale * 2.0**-10)
    assert np.all(np.abs(decoded - x) <= bound)


def test_zero_rows_decode_to_zeros(rows):
    decoded = fp8.decode(fp8.encode(rows))
    assert np.all(decoded[3] == 0) and np.all(decoded[5, :32] == 0)
    assert np.all(np.isfinite(fp8.unpack(fp8.encode(rows))[1].astype(np.float32)))


def test_device_decode_is_bit_identical(rows):
    packed = fp8.encode(rows)
    on_device = np.asarray(fp8.decode_jax(jnp.asarray(packed.reshape(4, 16, 264))))
    np.testing.assert_array_equal(on_device.reshape(64, 256), fp8.decode(packed))


@pytest.mark.parametrize("width", [0, 48, 100])
def test_width_not_multiple_of_32_refused(width):
    with pytest.raises(ValueError, match=f"row width {width} is not a positive multiple of 32"):
        fp8.encode(np.ones((2, width), np.float32))


def test_bad_packed_width_refused():
    with pytest.raises(ValueError, match="100 bytes per row is no packed FP8 row"):
        fp8.decode(np.zeros((1, 100), np.uint8))
