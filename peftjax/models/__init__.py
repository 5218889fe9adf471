"""Model definitions and loaders."""
from peftjax.models.bert import BertConfig, BertModel
from peftjax.models.llama import KVCache, LlamaConfig, LlamaForCausalLM, Linear, tiny_model
from peftjax.models.loading import from_pretrained
from peftjax.models.tokenizer import EncoderTokenizer, Tokenizer

__all__ = ["BertConfig", "BertModel", "EncoderTokenizer", "KVCache", "LlamaConfig", "LlamaForCausalLM", "Linear",
           "Tokenizer", "from_pretrained", "tiny_model"]
