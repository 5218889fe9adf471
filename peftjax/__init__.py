"""peftjax: parameter-efficient fine-tuning of language models in JAX / Flax NNX."""
