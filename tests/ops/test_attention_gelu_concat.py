"""attention_gelu_concat: [merge_heads(attn) | GELU_tanh(mlp)] for the single block's linear2."""

import pytest
import torch
import torch.nn.functional as F

import fastflow.ops as ops
from fastflow.errors import InputError
from fastflow.models.layers import merge_heads

from ._checks import assert_op_contract


def _inputs(dtype=torch.float32):
    attn = torch.randn(2, 3, 5, 16, dtype=dtype)
    linear1 = torch.randn(2, 5, 3 * 48 + 40, dtype=dtype)
    return attn, linear1[..., 3 * 48 :]  # the MLP columns: a strided slice, as the model passes them


def test_is_merge_heads_gelu_and_cat():
    attn, mlp = _inputs(torch.bfloat16)
    expected = torch.cat((merge_heads(attn), F.gelu(mlp.float(), approximate="tanh").bfloat16()), dim=-1)
    assert torch.equal(ops.attention_gelu_concat(attn, mlp), expected)


def test_op_contract():
    assert_op_contract(ops.attention_gelu_concat, torch.ops.fastflow.attention_gelu_concat.default, _inputs())


def test_bad_inputs():
    attn, mlp = _inputs()
    with pytest.raises(InputError, match=r"\[B, L, M\]"):
        ops.attention_gelu_concat(attn, mlp[:, :4])
    with pytest.raises(InputError, match="dtype"):
        ops.attention_gelu_concat(attn, mlp.double())
