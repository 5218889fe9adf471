"""The QLoRA base is bitsandbytes' base: every linear layer quantized by peftjax's policy dequantizes to exactly what
bitsandbytes makes of the same torch weight (the (out, in) layout, blocks of 64 along the input dimension), computed
live with bitsandbytes' CPU backend (the `interop` extra). NF4 and FP4 bit-identical; with double quantization
within 2 ulp (bitsandbytes' float32 arithmetic of the second-level scales)."""
import numpy as np
import pytest

from peftjax.models import Linear, tiny_model
from peftjax.quant.policy import QuantizedLinear, QuantRule, quantize_model
from peftjax.rules import modules_of_type

torch = pytest.importorskip("torch", reason="the interop extra (torch, bitsandbytes) is not installed")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

CASES = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


def bnb_dequantized(w_DO: np.ndarray, fmt: str, double_quant: bool) -> np.ndarray:
    """bitsandbytes' round trip of the layer's torch weight W^T (out, in), returned as (d_in, d_out)."""
    w = torch.from_numpy(np.ascontiguousarray(w_DO.T))
    codes, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=fmt, compress_statistics=double_quant)
    return bnb_functional.dequantize_4bit(codes, state).numpy().T


def check_model(model, fmt, double_quant):
    dense = modules_of_type(model, Linear)
    quantized = quantize_model(model, [QuantRule(format=fmt, block_size=64, double_quant=double_quant)])
    found = modules_of_type(quantized, QuantizedLinear)
    assert set(found) == set(dense)
    for path in sorted(found):
        ours = np.asarray(found[path].kernel(np.float32))
        theirs = bnb_dequantized(np.asarray(dense[path].weight[...], np.float32), fmt, double_quant)
        if double_quant:
            np.testing.assert_array_max_ulp(ours, theirs, maxulp=2)
        else:
            np.testing.assert_array_equal(ours, theirs, err_msg=path)


@pytest.mark.parametrize("fmt, double_quant", CASES)
def test_tiny_model_base_is_bitsandbytes_base(fmt, double_quant):
    check_model(tiny_model(seed=4), fmt, double_quant)


def test_blocks_run_along_the_input_dimension():
    """A block of 64 shares one absmax: the largest |w| among 64 *inputs* of one output unit."""
    model = tiny_model(seed=5)
    w = np.asarray(model.layers[0].mlp.up_proj.weight[...], np.float32)  # (64 in, 128 out)
    q = quantize_model(model, [QuantRule(format="nf4", block_size=64)]).layers[0].mlp.up_proj.weight.get_value()
    np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), np.abs(w).max(axis=0))  # one per output unit


@pytest.fixture(scope="module")
def smollm2():
    from peftjax.models import from_pretrained

    return from_pretrained("smollm2")[0]


@pytest.mark.slow
@pytest.mark.parametrize("fmt, double_quant", CASES)
def test_smollm2_base_is_bitsandbytes_base(smollm2, fmt, double_quant):
    """Every linear layer of the real SmolLM2-135M-Instruct (30 layers x 7 projections)."""
    check_model(smollm2, fmt, double_quant)
