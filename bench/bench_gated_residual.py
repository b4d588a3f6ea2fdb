"""gated_residual (x + gate * y) at FLUX.1 / SD3.5 block-boundary shapes. See bench/_ops_common.py."""

import torch
from _ops_common import Case, main

from fastflow.kernels._common import ROW_SHAPES
from fastflow.kernels.gated_residual import plan
from fastflow.ops import gated_residual
from fastflow.ops.reference import gated_residual_ref

SHAPES = ROW_SHAPES  # the shapes the kernel ships for (and the AOT report compiles)


def case(name, tokens, width, e=2):
    n = tokens * width
    # eager: gate * y (R y, W t), x + t (R x, R t, W out); fused: R x, R y, W out
    return Case(
        name,
        lambda dev, dt: (
            torch.randn(1, tokens, width, device=dev, dtype=dt),
            torch.randn(1, width, device=dev, dtype=dt),
            torch.randn(1, tokens, width, device=dev, dtype=dt),
        ),
        unfused_bytes=5 * n * e,
        unfused_kernels=2,
        flops=2 * n,
    )


if __name__ == "__main__":
    main(
        "gated_residual",
        gated_residual,
        gated_residual_ref,
        [case(k, *v) for k, v in SHAPES.items()],
        plan,
        tiny=[case("tiny", 16, 96)],
    )
