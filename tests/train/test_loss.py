"""The chunked head cross-entropy (peftjax.train.loss) against optax's dense cross-entropy of the full logits:
value, gradients for the hidden states and for the head, masks, ragged last chunks, and the memory it saves."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax.train.loss import head_cross_entropy


def _problem(N=37, D=16, V=50, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (N, D))
    w = 0.3 * jax.random.normal(k[1], (V, D))
    t = jax.random.randint(k[2], (N,), 0, V)
    m = (jax.random.uniform(k[3], (N,)) > 0.3).astype(jnp.float32)
    return h, w, t, m


def _dense(h, w, t, m):
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(h @ w.T, t) * m)


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
@pytest.mark.parametrize("jit", [False, True])
def test_value_and_gradients_equal_the_dense_loss(chunk, jit):
    h, w, t, m = _problem()
    f = lambda h, w: head_cross_entropy(h, w, t, m, chunk=chunk)  # noqa: E731
    grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1))) if jit else jax.value_and_grad(f, argnums=(0, 1))
    (v, (gh, gw)), (v_ref, (gh_ref, gw_ref)) = grad(h, w), jax.value_and_grad(_dense, argnums=(0, 1))(h, w, t, m)
    np.testing.assert_allclose(v, v_ref, rtol=2e-6)
    np.testing.assert_allclose(gh, gh_ref, atol=1e-6)
    np.testing.assert_allclose(gw, gw_ref, atol=1e-6)


def test_gradient_of_only_one_argument_and_unweighted_targets():
    h, w, t, _ = _problem()
    ones = jnp.ones(t.shape)
    np.testing.assert_allclose(head_cross_entropy(h, w, t, chunk=5), _dense(h, w, t, ones), rtol=2e-6)
    np.testing.assert_allclose(jax.grad(lambda w: head_cross_entropy(h, w, t, chunk=5))(w),
                               jax.grad(lambda w: _dense(h, w, t, ones))(w), atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda h: head_cross_entropy(h, w, t, chunk=5))(h),
                               jax.grad(lambda h: _dense(h, w, t, ones))(h), atol=1e-6)


def test_bfloat16_hidden_states_compute_logits_in_bfloat16_then_float32():
    h, w, t, m = _problem()
    hb = h.astype(jnp.bfloat16)
    ref = jnp.sum(optax.softmax_cross_entropy_with_integer_labels((hb @ w.astype(jnp.bfloat16).T)
                                                                  .astype(jnp.float32), t) * m)
    # XLA's bfloat16 dot may accumulate differently for an (8, D) than for an (N, D) operand: 1e-4 of the sum
    np.testing.assert_allclose(head_cross_entropy(hb, w, t, m, chunk=8), ref, rtol=1e-4)
    assert jax.grad(lambda h: head_cross_entropy(h, w, t, m, chunk=8))(hb).dtype == jnp.bfloat16


def test_the_backward_pass_never_holds_the_full_logits():
    N, D, V = 2048, 32, 8192
    h, w, t = jnp.zeros((N, D)), jnp.zeros((V, D)), jnp.zeros((N,), jnp.int32)
    logits_bytes = N * V * 4

    def temp(fn):
        return jax.jit(jax.grad(fn)).lower(h).compile().memory_analysis().temp_size_in_bytes

    assert temp(lambda h: _dense(h, w, t, jnp.ones((N,)))) >= logits_bytes  # the dense loss keeps them
    assert temp(lambda h: head_cross_entropy(h, w, t, chunk=128)) < logits_bytes / 4


@pytest.mark.parametrize("vocab", [32768, 3 * 5 * 1031])
def test_a_bfloat16_head_is_converted_a_vocabulary_slice_at_a_time(vocab):
    """float32 compute on a bfloat16 head: the same values and gradients as converting the head first, without
    a float32 copy of the whole head in the step."""
    from peftjax.train.loss import vocab_chunk

    N, D = 64, 256
    k = jax.random.split(jax.random.key(1), 3)
    h = jax.random.normal(k[0], (N, D))
    w = (0.1 * jax.random.normal(k[1], (vocab, D))).astype(jnp.bfloat16)
    t = jax.random.randint(k[2], (N,), 0, vocab)
    m = jnp.ones((N,))
    assert vocab_chunk(vocab) < vocab  # several slices
    f = lambda h, w: head_cross_entropy(h, w, t, m, chunk=16)  # noqa: E731
    ref = lambda h, w: _dense(h, w.astype(jnp.float32), t, m)  # noqa: E731
    np.testing.assert_allclose(f(h, w), ref(h, w), rtol=2e-6)
    (gh, gw), (gh_ref, gw_ref) = jax.grad(f, argnums=(0, 1))(h, w), jax.grad(ref, argnums=(0, 1))(h, w)
    np.testing.assert_allclose(gh, gh_ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gw, np.float32), np.asarray(gw_ref, np.float32), atol=1e-2, rtol=1e-2)
    temp = jax.jit(jax.grad(f)).lower(h, w).compile().memory_analysis().temp_size_in_bytes
    assert temp < vocab * D * 4  # less than a float32 copy of the whole head alone


@pytest.mark.parametrize("bf16_head", [False, True])
def test_soft_capped_logits_and_their_gradients(bf16_head):
    """Gemma 2's final-logit soft-capping c tanh(z / c): value and both gradients against autodiff of the dense
    capped loss (the unrolled bfloat16-head path too)."""
    h, w, t, m = _problem(V=64)
    w = 4.0 * w  # logits well into tanh's curved range, so the cap matters
    if bf16_head:
        w = w.astype(jnp.bfloat16)
    cap = 3.0

    def dense(h, w):
        z = h @ w.astype(jnp.float32).T
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(jnp.tanh(z / cap) * cap, t) * m)

    f = lambda h, w: head_cross_entropy(h, w, t, m, chunk=8, softcap=cap)  # noqa: E731
    (v, (gh, gw)), (v_ref, (gh_ref, gw_ref)) = (jax.value_and_grad(f, argnums=(0, 1))(h, w),
                                                jax.value_and_grad(dense, argnums=(0, 1))(h, w))
    np.testing.assert_allclose(v, v_ref, rtol=2e-6)
    np.testing.assert_allclose(gh, gh_ref, atol=2e-6)
    np.testing.assert_allclose(np.float32(gw), np.float32(gw_ref), atol=1e-2 if bf16_head else 2e-6)
    assert abs(float(v) - float(head_cross_entropy(h, w, t, m, chunk=8))) > 1.0  # capping changed the loss


@pytest.mark.parametrize("ways,chunk", [(4, 8), (4, 64), (8, 3)])
@pytest.mark.parametrize("bf16_head", [False, True])
def test_rows_split_over_devices_chunk_per_device_and_join_back(monkeypatch, ways, chunk, bf16_head):
    """On a mesh the loss's chunks take chunk / W rows from each device's own N / W rows (padded per device) and
    dh is put back in row order: the value and both gradients are the dense loss's. (The split is forced here on
    one device; the mesh tests check it inside the sharded step.)"""
    import peftjax.train.loss as L

    monkeypatch.setattr(L, "row_ways", lambda: ways)
    h, w, t, m = _problem(N=72)  # 72 = 4 x 18 and 8 x 9 rows per device: ragged last chunks
    w_stored = w.astype(jnp.bfloat16) if bf16_head else w
    f = lambda h, w: head_cross_entropy(h, w, t, m, chunk=chunk)  # noqa: E731
    v, (gh, gw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w_stored)
    v_ref, (gh_ref, gw_ref) = jax.value_and_grad(_dense, argnums=(0, 1))(h, w_stored.astype(jnp.float32), t, m)
    np.testing.assert_allclose(v, v_ref, rtol=2e-6)
    np.testing.assert_allclose(gh, gh_ref, atol=1e-6)
    tol = dict(atol=1e-2, rtol=1e-2) if bf16_head else dict(atol=1e-6)  # a bfloat16 head's gradient is bfloat16
    np.testing.assert_allclose(np.asarray(gw, np.float32), np.asarray(gw_ref, np.float32), **tol)
    assert L._Chunking(72, chunk).ways == ways
