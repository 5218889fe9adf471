"""fake_quant: the forward pass is dequantize(quantize(x)); the gradient is the identity (straight-through)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.errors import PeftjaxError
from peftjax.quant import dequantize, fake_quant, quantize


def normal(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.parametrize(("fmt", "kwargs"), [("nf4", {}), ("int8", dict(block_size=None)),
                                             ("int4", dict(axis=1, asymmetric=True)),
                                             ("fp4", dict(block_size=32, double_quant=True))])
def test_forward_is_the_round_trip(fmt, kwargs):
    x = normal(16, 48)
    expected = dequantize(quantize(x, fmt, **kwargs))
    np.testing.assert_array_equal(fake_quant(x, fmt, **kwargs), expected)
    np.testing.assert_array_equal(jax.jit(lambda x: fake_quant(x, fmt, **kwargs))(x), expected)


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
