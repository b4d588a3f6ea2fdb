"""groupnorm_silu kernel(s) under the Triton interpreter vs the reference (tolerance rule: _numerics.py)."""

import pytest
import torch

from fastflow.ops import reference as ref

from ._numerics import DTYPES, FLOOR, check, rand


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 512, 20, 30)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_groups_split_over_many_programs(shape, dtype, channels_last):
    """Groups whose spatial extent is split into slices (a ragged last one): partial statistics
    combined exactly. A large mean (100, std 1) checks the variance is not E[x^2] - E[x]^2: against
    a float64 GroupNorm, the kernel may err at most twice as much as the fp32 reference (+ floor)."""
    import torch.nn.functional as F

    from fastflow.kernels.groupnorm_silu import groupnorm_silu_fwd, plan

    x = rand(*shape, dtype=dtype, offset=100.0)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = rand(shape[1], dtype=dtype, seed=1, offset=1.0), rand(shape[1], dtype=dtype, seed=2)
    assert plan(x, w, b, 32, 1e-6).stats.grid[1] > 1
    got = groupnorm_silu_fwd(x, w, b, 32, 1e-6)
    truth = F.silu(F.group_norm(x.double().contiguous(), 32, w.double(), b.double(), 1e-6))
    reference = ref.groupnorm_silu_ref(x, w, b, 32, 1e-6)
    budget = 2 * (reference.double() - truth).abs().max().item() + FLOOR[dtype]
    assert (got.double() - truth).abs().max().item() <= budget
