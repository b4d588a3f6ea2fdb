import pytest
import torch

import fastflow.ops as ops
from fastflow.ops.reference import qk_norm_ref

from ._checks import assert_op_contract


@pytest.mark.parametrize("with_norm", [True, False], ids=["rms", "split-only"])
@pytest.mark.parametrize("heads,head_dim,seq", [(2, 64, 13), (1, 64, 1), (3, 32, 77)])
def test_matches_rmsnorm_formula(with_norm, heads, head_dim, seq):
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, seq, 3 * heads * head_dim, generator=g)
    qs, ks = (1 + 0.1 * torch.randn(head_dim, generator=g) for _ in range(2))
    q, k, v = qk_norm_ref(qkv, qs if with_norm else None, ks if with_norm else None, heads, 1e-6)
    parts = qkv.double().view(2, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double() if with_norm else x

    torch.testing.assert_close(q.double(), rms(parts[0], qs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.double(), rms(parts[1], ks), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, parts[2].float(), rtol=0, atol=0)


@pytest.mark.parametrize("with_norm", [True, False], ids=["rms", "split-only"])
def test_op_contract(with_norm):
    qkv = torch.randn(2, 9, 3 * 2 * 16)
    scales = (torch.rand(16) + 0.5, torch.rand(16) + 0.5) if with_norm else (None, None)
    assert_op_contract(ops.qk_norm, torch.ops.fastflow.qk_norm.default, (qkv, *scales, 2, 1e-6))


def test_bf16_output_dtype():
    q, k, v = ops.qk_norm(torch.randn(1, 5, 96).bfloat16(), torch.ones(16), torch.ones(16), 2)
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.shape == (1, 2, 5, 16)
