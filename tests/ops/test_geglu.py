import pytest
import torch
import torch.nn.functional as F

import fastflow.ops as ops
from fastflow.errors import InputError
from fastflow.ops.reference import geglu_ref

from ._checks import assert_op_contract


def test_matches_diffusers_expression():
    """fp32: diffusers' / sgm's GEGLU (h * F.gelu(gate) on the chunked projection) exactly."""
    x = torch.randn(3, 7, 2 * 40) * 3
    h, gate = x.chunk(2, dim=-1)
    torch.testing.assert_close(geglu_ref(x), h * F.gelu(gate), rtol=0, atol=0)


def test_low_precision_rounds_once():
    """bf16: computed in fp32 and rounded once, closer to the fp32 value than the unfused bf16
    expression (which rounds GELU(gate) first)."""
    x = (torch.randn(4096, 2 * 64) * 3).bfloat16()
    exact = geglu_ref(x.float())
    ours = (geglu_ref(x).float() - exact).abs().mean()
    h, gate = x.chunk(2, dim=-1)
    unfused = ((h * F.gelu(gate)).float() - exact).abs().mean()
    assert geglu_ref(x).dtype == torch.bfloat16 and ours < unfused


def test_op_contract_and_errors():
    x = torch.randn(2, 5, 2 * 24)
    assert_op_contract(ops.geglu, torch.ops.fastflow.geglu.default, (x,))
    assert ops.geglu(x).shape == (2, 5, 24)
    with pytest.raises(InputError, match="even last dimension"):
        ops.geglu(torch.randn(2, 5))
