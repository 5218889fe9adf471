"""Model definitions and loaders."""
from peftjax.models.llama import KVCache, LlamaConfig, LlamaForCausalLM, Linear, tiny_model
from peftjax.models.loading import from_pretrained
from peftjax.models.tokenizer import Tokenizer

__all__ = ["KVCache", "LlamaConfig", "LlamaForCausalLM", "Linear", "Tokenizer", "from_pretrained", "tiny_model"]
