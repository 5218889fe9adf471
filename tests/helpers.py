"""Small shared builders for tests."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import LlamaConfig, LlamaForCausalLM


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig.tiny(**overrides), rngs=nnx.Rngs(seed))


def random_blocks(batch: int, length: int, vocab: int = 256, seed: int = 0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32))
