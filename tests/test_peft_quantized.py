"""Every method on a quantized (NF4) base: only its parameters get gradients, and it trains."""
import pytest

from peftjax.quant.policy import QuantRule, quantize_model
from tests.helpers import tiny_model
from tests.test_peft_training import METHODS, check_method


@pytest.mark.parametrize("name", list(METHODS))
def test_method_on_quantized_base(name):
    check_method(name, quantize_model(tiny_model(num_layers=1), [QuantRule(format="nf4", block_size=64)]))
