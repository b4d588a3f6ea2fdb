"""groupnorm_silu at the VAE decoder's 1024x1024 shapes (REFERENCE.md 3.3). The kernel reads its
group three times (mean, centred variance, output) and writes once; eager GroupNorm reads twice and
writes once, then SiLU reads and writes again. See bench/_ops_common.py."""

import torch
from _ops_common import Case, main

from fastflow.kernels.groupnorm_silu import VAE_SHAPES, plan
from fastflow.ops import groupnorm_silu
from fastflow.ops.reference import groupnorm_silu_ref

SHAPES = VAE_SHAPES  # the shapes the kernel ships for (and the AOT report compiles)


def case(name, channels, side, e=2, channels_last=False):
    """``channels_last``: NHWC activations (the layout the CUDA C++ kernel takes)."""
    n = channels * side * side
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return Case(
        name + (" nhwc" if channels_last else ""),
        lambda dev, dt: (
            torch.randn(1, channels, side, side, device=dev, dtype=dt).contiguous(memory_format=fmt),
            torch.ones(channels, device=dev, dtype=dt),
            torch.zeros(channels, device=dev, dtype=dt),
            32,
            1e-6,
        ),
        unfused_bytes=5 * n * e,
        unfused_kernels=2,
        flops=10 * n,
    )


if __name__ == "__main__":
    cases = [case(k, *v, channels_last=last) for k, v in SHAPES.items() for last in (False, True)]
    main("groupnorm_silu", groupnorm_silu, groupnorm_silu_ref, cases, plan, tiny=[case("tiny", 64, 8)])
