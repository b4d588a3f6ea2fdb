import pytest
import torch

import fastflow.ops as ops
from fastflow.errors import InputError
from fastflow.ops.reference import groupnorm_silu_ref

from ._checks import assert_op_contract


def _formula(x, w, b, groups, eps):
    xd = x.double()
    n, c = xd.shape[:2]
    g = xd.reshape(n, groups, -1)
    normed = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)).reshape(
        xd.shape
    )
    y = normed * w.double().view(1, c, 1, 1) + b.double().view(1, c, 1, 1)
    return y * torch.sigmoid(y)


@pytest.mark.parametrize("shape", [(1, 64, 1, 1), (2, 64, 7, 5), (1, 128, 16, 16)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_formula(shape, channels_last):
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(shape, generator=g) + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    out = groupnorm_silu_ref(x, w, b, 32, 1e-6)
    torch.testing.assert_close(out.double(), _formula(x, w, b, 32, 1e-6), rtol=1e-5, atol=1e-5)


def test_op_contract():
    x = torch.randn(2, 64, 6, 5)
    assert_op_contract(
        ops.groupnorm_silu, torch.ops.fastflow.groupnorm_silu.default, (x, torch.rand(64), torch.randn(64), 32, 1e-6)
    )


def test_channels_not_divisible_is_a_clear_error():
    with pytest.raises(InputError, match="divisible by 32"):
        ops.groupnorm_silu(torch.randn(1, 48, 2, 2), torch.ones(48), torch.zeros(48))
