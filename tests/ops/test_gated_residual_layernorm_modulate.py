import pytest
import torch

import fastflow.ops as ops
from fastflow.ops.reference import gated_residual_ref, layernorm_modulate_ref

from ._checks import assert_op_contract


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 769), (1, 1, 64)], ids=lambda s: "x".join(map(str, s)))
def test_equals_the_two_ops_in_sequence(shape, dtype):
    g = torch.Generator().manual_seed(0)
    b, _, c = shape
    x, y = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    gate, shift, scale = (torch.randn(b, c, generator=g).to(dtype) for _ in range(3))
    r, h = ops.gated_residual_layernorm_modulate(x, gate, y, shift, scale)
    expected_r = gated_residual_ref(x, gate, y)
    torch.testing.assert_close(r, expected_r, rtol=0, atol=0)
    torch.testing.assert_close(h, layernorm_modulate_ref(expected_r, shift, scale, 1e-6), rtol=0, atol=0)


def test_op_contract():
    x, y = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    gate, shift, scale = torch.randn(2, 48), torch.randn(2, 48), torch.randn(2, 48)
    assert_op_contract(
        ops.gated_residual_layernorm_modulate,
        torch.ops.fastflow.gated_residual_layernorm_modulate.default,
        (x, gate, y, shift, scale, 1e-6),
    )
