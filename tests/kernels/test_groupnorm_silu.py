"""groupnorm_silu kernel(s) under the Triton interpreter vs the reference (tolerance rule: _numerics.py)."""

import pytest
import torch

from fastflow.ops import reference as ref

from ._numerics import DTYPES, check, rand


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 128, 16, 16), (2, 64, 7, 5), (1, 512, 4, 6)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_groupnorm_silu(shape, dtype, channels_last):
    from fastflow.kernels.groupnorm_silu import groupnorm_silu_fwd

    x = rand(*shape, dtype=dtype, scale=2.0, offset=0.5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = rand(shape[1], dtype=dtype, seed=1, offset=1.0), rand(shape[1], dtype=dtype, seed=2)
    out = groupnorm_silu_fwd(x, w, b, 32, 1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    check(out, ref.groupnorm_silu_ref, (x, w, b, 32, 1e-6), dtype)
