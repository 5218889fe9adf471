"""Formats and the registry: the codebooks' construction, encode/decode, and the errors users see."""
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.errors import PeftjaxError
from peftjax.quant import FORMATS, dequantize, known_formats, quantize, register_format, unpack_bits
from peftjax.quant.formats import _REGISTRY, CodebookFormat, IntFormat

EXPECTED = {f"int{k}" for k in range(2, 9)} | {f"nf{k}" for k in range(2, 9)} | {
    "fp4", "fp8_e4m3", "fp8_e5m2", "dynamic8"}


def test_known_formats():
    assert set(known_formats()) == EXPECTED == set(FORMATS)
    assert list(known_formats()) == sorted(EXPECTED)
    with pytest.raises(TypeError):
        FORMATS["mine"] = FORMATS["nf4"]  # read-only view: add formats with register_format


@pytest.mark.parametrize("bits", range(2, 9))
def test_normal_float_tables(bits):
    """QLoRA's construction: 2^k sorted values in [-1, 1], an exact zero, one more positive than negative value."""
    table = FORMATS[f"nf{bits}"].table
    assert table.dtype == np.float32 and table.size == 2**bits
    assert np.all(np.diff(table) > 0)
    assert table[0] == -1.0 and table[-1] == 1.0 and 0.0 in table
    assert (table > 0).sum() == 2 ** (bits - 1) and (table < 0).sum() == 2 ** (bits - 1) - 1


def test_fp4_table_in_bitsandbytes_code_order():
    table = FORMATS["fp4"].table
    np.testing.assert_array_equal(table[:8] * 12, [0, 0.0625, 8, 12, 4, 6, 2, 3])
    np.testing.assert_array_equal(table[9:], -table[1:8])


def test_fp4_zero_codes_split_by_sign():
    """Codes 0 and 8 both decode to 0; like bitsandbytes, tiny positive values take code 8, tiny negative code 0."""
    x = np.array([1.0, 1e-4, -1e-4, 0.0], np.float32)
    codes = unpack_bits(quantize(x, "fp4").codes, 4, 4)
    np.testing.assert_array_equal(codes, [3, 8, 0, 0])


@pytest.mark.parametrize("fmt", ["nf4", "nf8", "fp4", "dynamic8"])
def test_codebook_encode_is_nearest_entry(fmt):
    spec = FORMATS[fmt]
    s = np.linspace(-1, 1, 2001, dtype=np.float32)
    error = np.abs(np.asarray(spec.decode(spec.encode(jnp.asarray(s))), np.float64) - s)
    nearest_error = np.abs(s[:, None].astype(np.float64) - spec.table[None, :]).min(axis=1)
    # float32 midpoints: a value within an ulp of a midpoint may go either way
    assert np.all(error <= nearest_error + 2**-24)
    assert error.max() <= spec.max_error


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_is_the_ml_dtypes_cast(fmt):
    spec = FORMATS[fmt]
    s = np.random.default_rng(0).uniform(-spec.qmax, spec.qmax, 1000).astype(np.float32)
    np.testing.assert_array_equal(spec.decode(spec.encode(jnp.asarray(s))), s.astype(spec.dtype).astype(np.float32))


def test_int_format_codes_are_offset_binary():
    spec = FORMATS["int3"]
    assert isinstance(spec, IntFormat) and spec.qmax == 3
    np.testing.assert_array_equal(spec.encode(jnp.array([-3.0, -0.4, 0.6, 3.0])), [1, 4, 5, 7])


def test_register_a_new_codebook():
    uniform = CodebookFormat("uniform3", np.linspace(-1, 1, 8))
    register_format(uniform)
    try:
        assert "uniform3" in known_formats()
        x = np.random.default_rng(0).normal(size=(5, 40)).astype(np.float32)
        q = quantize(x, "uniform3", block_size=16)
        assert q.bits == 3 and q.codes.size == -(-200 * 3 // 8)
        assert np.abs(dequantize(q) - x).max() <= uniform.max_error * np.abs(x).max() * (1 + 1e-6)
        with pytest.raises(PeftjaxError, match="already registered"):
            register_format(uniform)
    finally:
        _REGISTRY.pop("uniform3")


def test_bad_codebook():
    with pytest.raises(PeftjaxError, match="2\\^k entries"):
        CodebookFormat("bad", [-1.0, 0.0, 1.0])


@pytest.mark.parametrize(("fmt", "message"), [
    ("int9", "'int9' asks for 9 bits; int formats exist for 2..8 bits"),
    ("nf1", "'nf1' asks for 1 bits; nf formats exist for 2..8 bits"),
    ("int1", "int formats exist for 2..8 bits"),
    ("fp8_e4m4", "unknown quantization format 'fp8_e4m4'; did you mean 'fp8_e4m3'\\?"),
    ("nf44", "'nf44' asks for 44 bits"),
    ("bf16", "unknown quantization format 'bf16'; known formats: dynamic8, fp4, fp8_e4m3, fp8_e5m2, int2, "),
])
def test_bad_format_names(fmt, message):
    with pytest.raises(PeftjaxError, match=message):
        quantize(np.ones(8, np.float32), fmt)
