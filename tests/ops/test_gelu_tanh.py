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


def test_cpu_bf16_runs_without_fp32_copies_and_bit_identical():
    """On a CPU, torch's bf16 / fp16 GELU computes in fp32 and rounds once: the reference hands it
    the tensor as is (no fp32 copy in, none out), with the same bits as the fp32 computation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    for dtype in (torch.bfloat16, torch.float16):
        x = (4 * torch.randn(3, 7, 1031)).to(dtype)  # an odd width: the vector loop's tail too
        with Ops() as mode:
            out = gelu_tanh_ref(x)
        assert mode.seen == ["gelu"], mode.seen
        assert torch.equal(out, torch.nn.functional.gelu(x.float(), approximate="tanh").to(dtype))
