import pytest
import torch

import fastflow.ops as ops
from fastflow.ops.reference import layernorm_modulate_ref

from ._checks import assert_op_contract

SHAPES = [(1, 1, 64), (2, 7, 769), (2, 33, 3072)]  # odd token counts and widths (vLLM style)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_layernorm_formula(shape, dtype):
    g = torch.Generator().manual_seed(0)
    b, _, c = shape
    x = (3 * torch.randn(shape, generator=g) + 1).to(dtype)
    shift, scale = torch.randn(b, c, generator=g).to(dtype), torch.randn(b, c, generator=g).to(dtype)
    out = layernorm_modulate_ref(x, shift, scale, 1e-6)
    xd = x.double()
    ln = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-6)
    expected = (1 + scale.double()[:, None]) * ln + shift.double()[:, None]
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_op_contract():
    x, shift, scale = torch.randn(2, 5, 96), torch.randn(2, 96), torch.randn(2, 96)
    assert_op_contract(ops.layernorm_modulate, torch.ops.fastflow.layernorm_modulate.default, (x, shift, scale, 1e-6))


def test_non_contiguous_input():
    x = torch.randn(2, 96, 5).transpose(1, 2)  # [2, 5, 96], strided
    shift, scale = torch.randn(2, 96), torch.randn(2, 96)
    torch.testing.assert_close(
        ops.layernorm_modulate(x, shift, scale), ops.layernorm_modulate(x.contiguous(), shift, scale)
    )


def test_backward_uses_reference():
    x = torch.randn(2, 3, 16, requires_grad=True)
    ops.layernorm_modulate(x, torch.zeros(2, 16), torch.zeros(2, 16)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
