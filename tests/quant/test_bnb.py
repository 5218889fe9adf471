"""Parity with bitsandbytes 0.50.2 (CPU backend) on tests/fixtures/bnb_4bit_reference.npz (16 NF4/FP4 cases)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.quant import FORMATS, DoubleQuantScales, dequantize, quantize, unpack_bits
from peftjax.quant.double_quant import binned_encode, cascade_mean

# bitsandbytes.functional.get_4bit_type("nf4"), as printed in its source
BNB_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

CASES = range(16)


@pytest.fixture(scope="module")
def bnb(fixture_path):
    with np.load(fixture_path("bnb_4bit_reference.npz")) as data:
        return dict(data)


def case(bnb, k):
    is_nf4, block_size = bnb[f"meta_{k}"]
    return bnb[f"x_{k}"], "nf4" if is_nf4 else "fp4", int(block_size)


def test_nf4_table_is_bitsandbytes():
    np.testing.assert_array_equal(FORMATS["nf4"].table, BNB_NF4)


def test_dynamic_map_is_bitsandbytes(bnb):
    np.testing.assert_array_equal(FORMATS["dynamic8"].table, bnb["dq_code"])


@pytest.mark.parametrize("k", CASES)
def test_4bit_bit_identical(bnb, k):
    x, fmt, block_size = case(bnb, k)
    q = quantize(x, fmt, block_size=block_size)
    np.testing.assert_array_equal(unpack_bits(q.codes, 4, x.size), bnb[f"codes_{k}"])
    np.testing.assert_array_equal(q.codes, bnb[f"packed_{k}"])
    np.testing.assert_array_equal(q.scales, bnb[f"absmax_{k}"])
    np.testing.assert_array_equal(dequantize(q), bnb[f"deq_{k}"])


@pytest.mark.parametrize("k", CASES)
def test_dequantize_bitsandbytes_double_quant_state(bnb, k):
    """Our dequantizer, fed bitsandbytes' own double-quantized state, reproduces its output to float32 rounding.

    (XLA fuses ``code * absmax2 + offset`` into one FMA, so a scale can differ from bitsandbytes' by one ulp.)
    """
    x, fmt, block_size = case(bnb, k)
    q = quantize(x, fmt, block_size=block_size, double_quant=True)
    theirs = DoubleQuantScales(codes=jnp.asarray(bnb[f"dq_qabsmax_{k}"]), absmax=jnp.asarray(bnb[f"dq_absmax2_{k}"]),
                               offset=jnp.asarray(bnb[f"dq_offset_{k}"]))
    q = dataclasses.replace(q, codes=jnp.asarray(bnb[f"packed_{k}"]), scales=theirs)
    np.testing.assert_array_max_ulp(np.asarray(dequantize(q)), bnb[f"dq_deq_{k}"], maxulp=2)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("k", CASES)
def test_double_quant_matches_bitsandbytes(bnb, k, jit):
    """offset, absmax2 and every 8-bit code bit-identical; dequantized values to float32 rounding (2 ulp)."""
    x, fmt, block_size = case(bnb, k)

    def quantize_dq(values):
        return quantize(values, fmt, block_size=block_size, double_quant=True)

    q = (jax.jit(quantize_dq) if jit else quantize_dq)(jnp.asarray(x))
    dq = q.scales
    assert np.asarray(dq.offset).tobytes() == np.float32(bnb[f"dq_offset_{k}"]).tobytes()
    np.testing.assert_array_equal(dq.absmax, bnb[f"dq_absmax2_{k}"])
    np.testing.assert_array_equal(dq.codes, bnb[f"dq_qabsmax_{k}"])
    np.testing.assert_array_equal(q.codes, bnb[f"packed_{k}"])
    np.testing.assert_array_max_ulp(np.asarray(dequantize(q)), bnb[f"dq_deq_{k}"], maxulp=2)


def test_cascade_mean_is_a_mean():
    """The torch summation order changes only the rounding: within a few ulp of the float64 mean at any size."""
    rng = np.random.default_rng(0)
    for n in [1, 7, 8, 31, 32, 33, 100, 513, 4097, 70_001]:
        x = rng.random(n, dtype=np.float32) * 10
        np.testing.assert_allclose(float(cascade_mean(jnp.asarray(x))), x.astype(np.float64).mean(), rtol=1e-6)


def test_binned_codes_are_nearest_away_from_midpoints():
    """A bin's code is the nearest map entry unless the value is within a bin of a midpoint, and never a bin worse."""
    table = FORMATS["dynamic8"].table.astype(np.float64)
    values = np.linspace(-1, 1, 200_001).astype(np.float32)
    blocks = np.concatenate([values, np.ones(256 - values.size % 256, np.float32)]).reshape(-1, 256)
    blocks[:, -1] = 1.0  # absmax 1 in every block, so the scaled value is the value itself
    codes = np.asarray(binned_encode(jnp.asarray(blocks[None]))[0]).ravel()
    nearest = np.abs(blocks.ravel()[:, None].astype(np.float64) - table[None, :]).argmin(axis=1)
    midpoints = (table[:-1] + table[1:]) / 2
    distance = np.abs(blocks.ravel()[:, None] - midpoints[None, :]).min(axis=1)
    differ = codes != nearest
    assert differ.any()  # the binned lookup is not plain nearest rounding
    assert np.all(distance[differ] <= 1 / 65535 + 1e-7)
    v = blocks.ravel().astype(np.float64)
    np.testing.assert_array_less(np.abs(table[codes] - v), np.abs(table[nearest] - v) + 2 / 65535 + 1e-7)
