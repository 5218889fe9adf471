"""peftjax.models.matmul: bfloat16 products accumulated in float32 on CPU, with their own gradients."""
import jax
import jax.numpy as jnp
import numpy as np

from peftjax.models.matmul import accumulates_in_float32, matmul, product, product_f32


def _operands(shape_x=(3, 5, 24), shape_w=(24, 16)):
    kx, kw = jax.random.split(jax.random.key(0))
    return (jax.random.normal(kx, shape_x).astype(jnp.bfloat16),
            jax.random.normal(kw, shape_w).astype(jnp.bfloat16))


def _bf16_close(actual, desired):
    """Within one bfloat16 rounding of the float32 value (relative 2^-8, plus a little for the sum's order)."""
    actual, desired = np.asarray(actual, np.float32), np.asarray(desired, np.float32)
    np.testing.assert_allclose(actual, desired, rtol=2 ** -7, atol=1e-2 * np.abs(desired).max())


def test_forward_is_the_float32_product_rounded_once():
    assert accumulates_in_float32(jnp.bfloat16) == (jax.default_backend() == "cpu")
    x, w = _operands()
    exact = x.astype(jnp.float32) @ w.astype(jnp.float32)
    y = matmul(x, w)
    assert y.dtype == jnp.bfloat16 and y.shape == (3, 5, 16)
    _bf16_close(y, exact)
    wide = product_f32(x, w)  # not rounded: the float32 sum of the exact bfloat16 x bfloat16 products
    assert wide.dtype == jnp.float32
    np.testing.assert_allclose(wide, exact, rtol=1e-5, atol=1e-5)
    _bf16_close(product(x, w), exact)
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)  # float32 operands: exactly x @ w
    np.testing.assert_array_equal(matmul(x32, w32), x32 @ w32)


def test_gradients_are_the_float32_gradients_rounded():
    """d/dx sum(c * (x @ w)) = c @ w^T and d/dw = x^T c (over every row of a (3, 5, D) input)."""
    x, w = _operands()
    c = jax.random.normal(jax.random.key(1), (3, 5, 16))
    gx, gw = jax.grad(lambda x, w: jnp.sum(c * matmul(x, w).astype(jnp.float32)), argnums=(0, 1))(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    # the cotangent reaching the product is c rounded to bfloat16 (the output's dtype)
    cb = c.astype(jnp.bfloat16).astype(jnp.float32)
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    _bf16_close(gx, cb @ w32.T)
    _bf16_close(gw, x32.reshape(-1, 24).T @ cb.reshape(-1, 16))
