"""quantize / dequantize / QArray: closed forms, error bounds, storage accounting, pytree and jit behaviour, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from peftjax.errors import PeftjaxError
from peftjax.quant import FORMATS, QArray, dequantize, known_formats, quantize, unpack_bits
from peftjax.quant.double_quant import dequantize_scales

quantize_jit = jax.jit(quantize, static_argnames=("fmt", "block_size", "axis", "double_quant", "asymmetric", "name"))
dequantize_jit = jax.jit(dequantize, static_argnames="dtype")


def normal(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def group_view(x, q):
    """x as q's (A, B, C) group view (zero-padded), computed independently with numpy."""
    flat = np.zeros(int(np.prod(q.groups)), np.float32)
    flat[: x.size] = np.ravel(x)
    return flat.reshape(q.groups)


def per_element(values_B, q):
    """Broadcast one value per group back to q's logical elements."""
    return np.broadcast_to(np.asarray(values_B)[None, :, None], q.groups).reshape(-1)[: q.size].reshape(q.shape)


def error_bound(x, q):
    """Largest |x - dequantize(q)| each element may have (the QArray invariant), with float32 slack."""
    x_ABC = group_view(np.asarray(x, np.float32), q)
    # jitted like the decode inside dequantize: XLA's multiply-add rounds once, and where the offset cancels most of
    # a double-quantized scale that one rounding shows at the scale's own precision
    stored = np.asarray(jax.jit(dequantize_scales)(q.scales) if q.double_quant else q.scales, np.float64)
    if q.asymmetric:
        levels = 2**q.bits - 1
        lo, hi = np.minimum(x_ABC.min(axis=(0, 2)), 0), np.maximum(x_ABC.max(axis=(0, 2)), 0)
        true = hi.astype(np.float64) / levels - lo.astype(np.float64) / levels
        bound_B, magnitude_B = 0.5 * true + levels * np.abs(true - stored), np.maximum(hi, -lo)
    else:
        true = np.abs(x_ABC).max(axis=(0, 2)).astype(np.float64)
        bound_B, magnitude_B = q.format.max_error * true + np.abs(true - stored), true
    return per_element(bound_B * (1 + 1e-5) + 1e-6 * magnitude_B + 1e-37, q)


def assert_round_trip(x, q):
    deq = np.asarray(dequantize(q, jnp.float32), np.float64)
    assert deq.shape == np.shape(x) and np.all(np.isfinite(deq))
    excess = np.abs(deq - np.asarray(x, np.float64)) - error_bound(x, q)
    assert excess.max() <= 0, f"{q}: error exceeds the bound by {excess.max()}"


# --- closed forms and error bounds ---------------------------------------------------------------------------------

def test_int8_per_tensor_is_llm_int8():
    x = normal(16, 24) * 3
    q = quantize(x, "int8", block_size=None)
    x_q = np.round(np.float32(127) / np.abs(x).max() * x)  # LLM.int8(): X_q = round(127 / max|X| * X)
    np.testing.assert_array_equal(unpack_bits(q.codes, 8, x.size).astype(np.int32) - 128, x_q.ravel())
    np.testing.assert_array_equal(q.scales, [np.abs(x).max()])
    assert q.groups == (1, 1, x.size) and q.block_size is None


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_int_per_channel(bits, axis):
    x = normal(3, 20, 7) * np.array([1e-3, 1.0, 50.0], np.float32)[:, None, None]
    q = quantize(x, f"int{bits}", axis=axis)
    others = tuple(a for a in range(3) if a != axis % 3)
    np.testing.assert_array_equal(q.scales, np.abs(x).max(axis=others))  # one scale per index of `axis`
    scale = np.expand_dims(np.abs(x).max(axis=others), others) / (2 ** (bits - 1) - 1)
    assert np.all(np.abs(dequantize(q) - x) <= scale / 2 * (1 + 1e-5))  # half a step per element


@pytest.mark.parametrize("bits", [3, 8])
def test_int_blockwise(bits):
    x = normal(10, 30)
    q = quantize(x, f"int{bits}", block_size=32)
    assert q.padding == 20 and q.scales.shape == (10,)
    scale = per_element(np.abs(group_view(x, q)).max(axis=(0, 2)), q) / (2 ** (bits - 1) - 1)
    assert np.all(np.abs(dequantize(q) - x) <= scale / 2 * (1 + 1e-5))


@pytest.mark.parametrize("fmt", ["int2", "int4", "int8"])
def test_asymmetric_uses_the_range(fmt):
    x = np.abs(normal(4, 64)) + 2.0  # all positive: a zero point halves the step of the symmetric grid
    sym, asym = quantize(x, fmt, block_size=64), quantize(x, fmt, block_size=64, asymmetric=True)
    assert asym.zero_points.dtype == np.uint8 and asym.zero_points.shape == (4,)
    assert_round_trip(x, asym)
    assert np.abs(dequantize(asym) - x).max() < np.abs(dequantize(sym) - x).max()
    np.testing.assert_array_equal(dequantize(quantize(np.zeros(5, np.float32), fmt, asymmetric=True)), 0)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_round_trips(fmt):
    x = normal(7, 50) * np.logspace(-3, 3, 50, dtype=np.float32)
    assert_round_trip(x, quantize(x, fmt, block_size=50))


def test_all_zero_blocks_and_tensors():
    x = normal(4, 64)
    x[1] = 0
    for fmt in ("nf4", "fp4", "int4", "fp8_e4m3"):
        deq = np.asarray(dequantize(quantize(x, fmt, block_size=64, double_quant=True)))
        assert np.all(np.isfinite(deq)) and np.all(deq[1] == 0)
        np.testing.assert_array_equal(dequantize(quantize(np.zeros((3, 5), np.float32), fmt)), 0)


# --- storage ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("double_quant", "expected"), [(True, 4.127), (False, 4.5)])
def test_qlora_bits_per_param(double_quant, expected):
    """NF4 at block 64 on 4096 x 4096: 4 + 32/64 bits, or 4 + 8/64 + 32/(64 * 256) (+ one float) with DQ."""
    spec = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    q = jax.eval_shape(lambda w: quantize(w, "nf4", block_size=64, double_quant=double_quant), spec)
    assert round(q.bits_per_param, 3) == expected
    overhead = (8 * 4096 * 4096 // 64 + 32 * 4096 * 4096 // 64 // 256 + 32) if double_quant else 32 * 4096 * 4096 // 64
    assert q.nbytes * 8 == 4 * 4096 * 4096 + overhead


def test_storage_counts_real_leaves_and_not_padding():
    x = normal(3, 1000)
    for fmt, bits in (("nf4", 4), ("int3", 3), ("nf6", 6), ("fp8_e5m2", 8)):
        q = quantize(x, fmt, block_size=64, double_quant=True)
        assert q.codes.shape == (-(-3000 * bits // 8),) and q.padding == 47 * 64 - 3000
        assert q.nbytes == sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(q))
        assert q.bits_per_param == 8 * q.nbytes / 3000 and q.size == 3000 and q.shape == (3, 1000)


# --- pytree, dtype, jit ----------------------------------------------------------------------------------------------

def test_qarray_is_a_pytree_with_static_metadata():
    q = quantize(normal(8, 16), "nf4", double_quant=True)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert [leaf.dtype for leaf in leaves] == [np.uint8, np.uint8, np.float32, np.float32]
    assert treedef.num_leaves == 4 and jax.tree_util.tree_unflatten(treedef, leaves).scales.offset is leaves[3]
    rebuilt = jax.tree.map(lambda a: a, q)
    assert isinstance(rebuilt, QArray) and rebuilt.fmt == "nf4" and rebuilt.shape == (8, 16)
    assert "nf4" in repr(q) and "bits/param" in repr(q)


def test_dtypes():
    x = jnp.asarray(normal(8, 16), jnp.bfloat16)
    q = quantize(x, "nf4")
    assert dequantize(q).dtype == jnp.bfloat16 and dequantize(q, jnp.float32).dtype == jnp.float32
    assert dequantize(q, "float16").dtype == jnp.float16


def test_dequantize_inside_jit_matmul():
    w, x = normal(64, 32), normal(4, 64, seed=1)
    q = quantize(w, "nf4", double_quant=True)
    y = jax.jit(lambda q, x: x @ dequantize(q, jnp.float32))(q, x)
    np.testing.assert_allclose(y, x @ np.asarray(dequantize(q)), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_round_trip_property(data):
    """Any shape, grouping and format; values up to the float32 extremes: finite, within the format's bound."""
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=24), label="shape")
    fmt = data.draw(st.sampled_from(sorted(known_formats())), label="fmt")
    block_size = data.draw(st.one_of(st.none(), st.integers(1, 300)), label="block_size")
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)), label="axis")
    asymmetric = fmt.startswith("int") and data.draw(st.booleans(), label="asymmetric")
    double_quant = data.draw(st.booleans(), label="double_quant")
    magnitude = float(np.float32(data.draw(st.sampled_from([1e-38, 1.0, 3e38]), label="magnitude")))
    elements = st.floats(-magnitude, magnitude, width=32, allow_nan=False, allow_infinity=False)
    x = data.draw(hnp.arrays(np.float32, shape, elements=elements | st.just(0.0)), label="x")
    q = quantize(x, fmt, block_size=block_size, axis=axis, double_quant=double_quant, asymmetric=asymmetric)
    assert_round_trip(x, q)


@settings(max_examples=6, deadline=None)
@given(shape=st.sampled_from([(37,), (2, 3, 9)]),  # few shapes: without jit every op compiles per shape
       fmt=st.sampled_from(["nf4", "fp4", "int5", "nf3", "fp8_e4m3"]), block_size=st.sampled_from([None, 1, 16, 50]),
       asymmetric=st.booleans(), double_quant=st.booleans(), data=st.data())
def test_jit_and_no_jit_agree(shape, fmt, block_size, asymmetric, double_quant, data):
    x = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-10, 10, width=32)), label="x")
    kwargs = dict(block_size=block_size, double_quant=double_quant, asymmetric=asymmetric and fmt == "int5")
    q = quantize_jit(x, fmt, **kwargs)
    with jax.disable_jit():
        q_eager = quantize(x, fmt, **kwargs)
        deq_eager = dequantize(q_eager)
    np.testing.assert_array_equal(q.codes, q_eager.codes)
    if double_quant:
        # XLA fuses a product and the addition after it into one FMA (centring and decoding the scales), so the
        # double-quantized scales may differ in the last bit; the values agree to float32 rounding of the scales
        np.testing.assert_allclose(dequantize_jit(q), deq_eager, rtol=0, atol=1e-6 * np.abs(x).max())
    else:
        for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(q_eager), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(dequantize_jit(q), deq_eager)


# --- user errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(block_size=-64), "block_size must be a positive integer"),
    (dict(block_size=1.5), "block_size must be a positive integer"),
    (dict(axis=2), "axis=2 is out of range for a tensor of shape \\(4, 8\\)"),
    (dict(asymmetric=True), "asymmetric=True needs an integer format"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(PeftjaxError, match=message):
        quantize(normal(4, 8), "nf4", **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_the_tensor(bad):
    x = normal(4, 8)
    x[2, 3] = bad
    with pytest.raises(PeftjaxError, match="^layers.3.mlp.up_proj: weight contains NaN or inf \\(1 of 32 values\\)"):
        quantize(x, "nf4", name="layers.3.mlp.up_proj")
    with pytest.raises(PeftjaxError, match="^quantize: weight contains NaN or inf"):
        quantize(x, "int8")


def test_traced_input_skips_the_finite_check():
    x = normal(4, 8)
    x[0, 0] = np.nan
    quantize_jit(x, "nf4")  # no concrete values to check under tracing; must not raise


def test_other_bad_inputs():
    with pytest.raises(PeftjaxError, match="floating-point"):
        quantize(np.arange(8), "int8")
    with pytest.raises(PeftjaxError, match="empty"):
        quantize(np.zeros((0, 4), np.float32), "nf4")
    with pytest.raises(PeftjaxError, match="expects a QArray"):
        dequantize(normal(4))
    with pytest.raises(PeftjaxError, match="dtype must be a floating-point type"):
        dequantize(quantize(normal(4), "nf4"), jnp.int32)
