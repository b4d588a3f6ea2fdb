import pytest
import torch

import fastflow.ops as ops
from fastflow.ops.reference import attention_ref

from ._checks import assert_op_contract


@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 16), (2, 3, 77, 64), (1, 2, 129, 128)], ids=lambda s: "x".join(map(str, s))
)
def test_matches_softmax_formula(shape):
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-1, -2) / shape[-1] ** 0.5, dim=-1) @ v
    torch.testing.assert_close(attention_ref(q.float(), k.float(), v.float()).double(), expected, rtol=1e-5, atol=1e-5)


def test_explicit_scale():
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1) @ v
    torch.testing.assert_close(ops.attention(q, k, v, scale=0.3), expected, rtol=1e-5, atol=1e-5)


def test_op_contract():
    q, k, v = torch.randn(2, 2, 11, 32), torch.randn(2, 2, 13, 32), torch.randn(2, 2, 13, 32)
    assert_op_contract(ops.attention, torch.ops.fastflow.attention.default, (q, k, v, None), contiguous=False)
