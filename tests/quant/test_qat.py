"""fake_quant: the forward pass is dequantize(quantize(x)); the gradient is the identity (straight-through)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.errors import PeftjaxError
from peftjax.quant import fake_quant


def normal(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


# the NF4 code values as published with QLoRA (Dettmers et al. 2023, bitsandbytes' NF4 table)
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])


def test_forward_is_absmax_int8_in_closed_form():
    """fake_quant(x, int8, one scale per tensor) = round(127 / max|x| * x) * max|x| / 127, in numpy float64."""
    x = normal(16, 48)
    a = np.abs(np.asarray(x, np.float64)).max()
    expected = np.round(127 / a * np.asarray(x, np.float64)) * a / 127
    np.testing.assert_allclose(fake_quant(x, "int8", block_size=None), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda x: fake_quant(x, "int8", block_size=None))(x), expected, atol=1e-6)


def test_forward_is_nf4_nearest_code_per_block():
    """NF4, blocks of 64: each value becomes the nearest of the 16 published codes times its block's absmax."""
    x = normal(16, 48)
    blocks = np.asarray(x, np.float64).reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    codes = np.abs(blocks[..., None] / absmax[..., None] - NF4).argmin(axis=-1)
    expected = (NF4[codes] * absmax).reshape(16, 48)
    np.testing.assert_allclose(fake_quant(x, "nf4"), expected, rtol=0, atol=1e-6)


def test_gradient_is_identity():
    x, g = normal(8, 64), normal(8, 64, seed=1)
    grad = jax.grad(lambda x: jnp.sum(fake_quant(x, "nf4") * g))(x)
    np.testing.assert_array_equal(grad, g)


def test_trains_a_lora_merged_weight_under_jit():
    """d/dB and d/dA of a loss through fake_quant(W + B @ A) equal those without quantization (STE)."""
    w, b, a, x = normal(32, 24), normal(32, 4, seed=1), normal(4, 24, seed=2), normal(5, 32, seed=3)

    def loss(params, quantized):
        merged = w + params["b"] @ params["a"]
        weight = fake_quant(merged, "nf4", block_size=64) if quantized else merged
        return jnp.sum((x @ weight) ** 2)

    params = {"b": b, "a": a}
    y = x @ (w + b @ a)
    y_q = x @ fake_quant(w + b @ a, "nf4", block_size=64)
    grads = jax.jit(jax.grad(loss), static_argnums=1)(params, True)
    # the upstream gradient is 2 y_q (quantized forward); STE passes it unchanged to the merged weight
    g_weight = x.T @ (2 * y_q)
    np.testing.assert_allclose(grads["b"], g_weight @ a.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["a"], b.T @ g_weight, rtol=1e-4, atol=1e-4)
    assert not np.allclose(y, y_q)  # the forward pass really is quantized


def test_bad_format_is_a_user_error():
    with pytest.raises(PeftjaxError, match="unknown quantization format"):
        fake_quant(normal(4), "nf17x")
