"""Parity with bitsandbytes 0.50.2 (CPU backend) on ../shared/fixtures/bnb_4bit_reference.npz (16 NF4/FP4 cases)."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.quant import FORMATS, DoubleQuantScales, dequantize, quantize, unpack_bits
from tests.conftest import fixture_path

# bitsandbytes.functional.get_4bit_type("nf4"), as printed in its source
BNB_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

CASES = range(16)


@pytest.fixture(scope="module")
def bnb():
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


@pytest.mark.parametrize("k", CASES)
def test_double_quant_matches_bitsandbytes(bnb, k):
    """offset and absmax2 to float32 rounding; the 8-bit codes equal except at near-ties; the output agrees.

    bitsandbytes' CPU kernel scales by an approximate reciprocal, so a value within about 4e-4 (relative) of the
    midpoint between two dynamic-map entries may land on the farther one; we always take the nearest.
    """
    x, fmt, block_size = case(bnb, k)
    q = quantize(x, fmt, block_size=block_size, double_quant=True)
    dq = q.scales
    offset_error = abs(float(dq.offset) - float(bnb[f"dq_offset_{k}"]))  # float32 sums in different orders
    assert offset_error <= 4 * np.spacing(bnb[f"dq_offset_{k}"])
    # absmax2 = max |absmax - offset| moves with the offset
    np.testing.assert_allclose(dq.absmax, bnb[f"dq_absmax2_{k}"], rtol=2e-7, atol=offset_error)

    ours, theirs = np.asarray(dq.codes), bnb[f"dq_qabsmax_{k}"]
    differ = np.flatnonzero(ours != theirs)
    assert differ.size <= max(1, theirs.size // 200)
    table = bnb["dq_code"]
    for i in differ:
        assert abs(int(ours[i]) - int(theirs[i])) == 1
        midpoint = (table[ours[i]] + table[theirs[i]]) / 2
        scaled = (bnb[f"absmax_{k}"][i] - bnb[f"dq_offset_{k}"]) / bnb[f"dq_absmax2_{k}"][i // 256]
        assert abs(scaled - midpoint) <= 4e-4 * abs(scaled)

    same_scale = np.repeat(ours == theirs, block_size)[: x.size].reshape(x.shape)
    deq = np.asarray(dequantize(q))
    np.testing.assert_allclose(deq[same_scale], bnb[f"dq_deq_{k}"][same_scale], rtol=2e-6, atol=1e-9)
    # where a scale code differs, the scale moves by one dynamic-map step
    step = np.diff(table).max() * bnb[f"dq_absmax2_{k}"].max()
    np.testing.assert_allclose(deq, bnb[f"dq_deq_{k}"], rtol=0, atol=step)
