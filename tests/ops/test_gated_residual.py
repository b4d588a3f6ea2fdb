import pytest
import torch

import fastflow.ops as ops
from fastflow.ops.reference import gated_residual_ref

from ._checks import assert_op_contract


@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 17, 769)], ids=lambda s: "x".join(map(str, s)))
def test_matches_formula(shape):
    x, y = torch.randn(shape), torch.randn(shape)
    gate = torch.randn(shape[0], shape[2])
    torch.testing.assert_close(gated_residual_ref(x, gate, y), x + gate[:, None, :] * y)


def test_bf16_rounds_once():
    x = torch.randn(2, 4, 64).bfloat16()
    y = torch.randn(2, 4, 64).bfloat16()
    gate = torch.randn(2, 64).bfloat16()
    out = gated_residual_ref(x, gate, y)
    expected = (x.double() + gate.double()[:, None] * y.double()).bfloat16()
    assert out.dtype == torch.bfloat16
    # one rounding of the exact result: at most half an ulp apart, i.e. equal after rounding
    assert (out.float() - expected.float()).abs().max() <= (expected.float().abs() * 2**-8).max()


def test_op_contract():
    x, y, gate = torch.randn(2, 5, 33), torch.randn(2, 5, 33), torch.randn(2, 33)
    assert_op_contract(ops.gated_residual, torch.ops.fastflow.gated_residual.default, (x, gate, y))
