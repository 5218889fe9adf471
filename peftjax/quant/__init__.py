"""Quantization of frozen weights: k-bit integer, NormalFloat, FP4 and FP8 formats, bit packing, double quantization
(QLoRA, Dettmers et al. 2023; LLM.int8(), Dettmers et al. 2022), and fake quantization for training.

    q = quantize(w, "nf4", block_size=64, double_quant=True)   # QArray pytree: packed codes + scales
    w_hat = dequantize(q, jnp.float32)                        # inside the jitted matmul
"""
from peftjax.quant.double_quant import DoubleQuantScales
from peftjax.quant.formats import FORMATS, Format, get_format, known_formats, register_format
from peftjax.quant.pack import pack_bits, unpack_bits
from peftjax.quant.qarray import QArray, dequantize, quantize
from peftjax.quant.qat import fake_quant

__all__ = [
    "FORMATS",
    "DoubleQuantScales",
    "Format",
    "QArray",
    "dequantize",
    "fake_quant",
    "get_format",
    "known_formats",
    "pack_bits",
    "quantize",
    "register_format",
    "unpack_bits",
]
