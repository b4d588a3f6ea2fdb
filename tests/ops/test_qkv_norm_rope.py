"""qkv_norm_rope / joint_qkv_norm_rope: the qk_norm_rope family on separate q, k, v projections."""

import pytest
import torch

import fastflow.ops as ops
from fastflow.errors import InputError
from fastflow.ops.reference import joint_qk_norm_rope_ref, joint_qkv_norm_rope_ref, qk_norm_rope_ref, qkv_norm_rope_ref

from ._checks import assert_op_contract


def _tables(seq, half, seed=3):
    angles = torch.rand(seq, half, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 50
    return angles.cos().float(), angles.sin().float()


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norm-only"])
def test_equals_the_fused_qkv_form(rope):
    """Three projections give exactly what their concatenation [q | k | v] gives the fused op."""
    g = torch.Generator().manual_seed(0)
    heads, d, seq = 3, 16, 7
    q, k, v = (torch.randn(2, seq, heads * d, generator=g) for _ in range(3))
    qs, ks = (1 + 0.1 * torch.randn(d, generator=g) for _ in range(2))
    cos, sin = _tables(seq, d // 2) if rope else (None, None)
    got = qkv_norm_rope_ref(q, k, v, qs, ks, cos, sin, heads, 1e-6)
    qkv = torch.cat([q, k, v], dim=-1)
    if rope:
        expected = qk_norm_rope_ref(qkv, qs, ks, cos, sin, heads, 1e-6)
    else:
        expected = ops.reference.qk_norm_ref(qkv, qs, ks, heads, 1e-6)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got[2], v.view(2, seq, heads, d).transpose(1, 2), rtol=0, atol=0)


def test_joint_equals_the_fused_joint_form():
    g = torch.Generator().manual_seed(1)
    heads, d = 2, 16
    a = [torch.randn(1, 5, heads * d, generator=g) for _ in range(3)]
    b = [torch.randn(1, 11, heads * d, generator=g) for _ in range(3)]
    scales = [1 + 0.1 * torch.randn(d, generator=g) for _ in range(4)]
    cos, sin = _tables(16, d // 2)
    got = joint_qkv_norm_rope_ref(*a, *b, *scales, cos, sin, heads, 1e-6)
    expected = joint_qk_norm_rope_ref(torch.cat(a, -1), torch.cat(b, -1), *scales, cos, sin, heads, 1e-6)
    for x, y in zip(got, expected, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norm-only"])
def test_op_contract(rope):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 9, 2 * 16, generator=g) for _ in range(3))
    cos, sin = _tables(9, 8) if rope else (None, None)
    args = (q, k, v, torch.rand(16) + 0.5, torch.rand(16) + 0.5, cos, sin, 2, 1e-6)
    assert_op_contract(ops.qkv_norm_rope, torch.ops.fastflow.qkv_norm_rope.default, args)


def test_joint_op_contract():
    g = torch.Generator().manual_seed(3)
    a = [torch.randn(2, 3, 32, generator=g) for _ in range(3)]
    b = [torch.randn(2, 6, 32, generator=g) for _ in range(3)]
    scales = [torch.rand(16) + 0.5 for _ in range(4)]
    args = (*a, *b, *scales, *_tables(9, 8), 2, 1e-6)
    assert_op_contract(ops.joint_qkv_norm_rope, torch.ops.fastflow.joint_qkv_norm_rope.default, args)


def test_bad_inputs_say_what_is_wrong():
    q = torch.randn(1, 4, 32)
    with pytest.raises(InputError, match="one shape"):
        ops.qkv_norm_rope(q, q, torch.randn(1, 5, 32), None, None, None, None, 2, 1e-6)
    with pytest.raises(InputError, match="RoPE tables must be"):
        ops.qkv_norm_rope(q, q, q, None, None, torch.ones(3, 8), torch.ones(3, 8), 2, 1e-6)
    with pytest.raises(InputError, match="both RoPE tables"):
        ops.qkv_norm_rope(q, q, q, None, None, torch.ones(4, 8), None, 2, 1e-6)
    with pytest.raises(InputError, match="share batch"):
        ops.joint_qkv_norm_rope(q, q, q, *[torch.randn(2, 4, 32)] * 3, None, None, None, None, None, None, 2, 1e-6)
