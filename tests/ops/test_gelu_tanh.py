import math

import torch

import fastflow.ops as ops
from fastflow.ops.reference import gelu_tanh_ref

from ._checks import assert_op_contract


def test_matches_tanh_formula():
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    expected = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(gelu_tanh_ref(x.float()).double(), expected, rtol=1e-6, atol=1e-6)


def test_keeps_dtype_and_shape():
    x = torch.randn(3, 5, 769).bfloat16()
    out = ops.gelu_tanh(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_op_contract():
    x = torch.randn(2, 7, 40)
    assert_op_contract(ops.gelu_tanh, torch.ops.fastflow.gelu_tanh.default, (x,))


def test_bias_gelu_matches_formula_and_contract():
    from fastflow.ops.reference import bias_gelu_tanh_ref

    x, bias = torch.randn(2, 5, 48), torch.randn(48)
    torch.testing.assert_close(bias_gelu_tanh_ref(x, bias), gelu_tanh_ref(x + bias))
    assert_op_contract(ops.bias_gelu_tanh, torch.ops.fastflow.bias_gelu_tanh.default, (x, bias))
