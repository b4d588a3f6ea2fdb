"""gated_residual_layernorm_modulate at FLUX.1 / SD3.5 sub-block boundaries. Eager: gate * y,
x + t (2 kernels), then LayerNorm, (1 + scale) *, + shift (3 kernels), re-reading r; fused: read x
and y once, write r and h. See bench/_ops_common.py."""

import torch
from _ops_common import Case, main

from fastflow.kernels._common import ROW_SHAPES
from fastflow.kernels.gated_residual_layernorm_modulate import plan
from fastflow.ops import gated_residual_layernorm_modulate
from fastflow.ops.reference import gated_residual_layernorm_modulate_ref

SHAPES = ROW_SHAPES  # the shapes the kernel ships for (and the AOT report compiles)


def case(name, tokens, width, e=2):
    n = tokens * width

    def make(dev, dt):
        x, y = (torch.randn(1, tokens, width, device=dev, dtype=dt) for _ in range(2))
        gate, shift, scale = (torch.randn(1, width, device=dev, dtype=dt) for _ in range(3))
        return x, gate, y, shift, scale

    return Case(name, make, unfused_bytes=11 * n * e, unfused_kernels=5, flops=10 * n)


if __name__ == "__main__":
    main(
        "gated_residual_layernorm_modulate",
        gated_residual_layernorm_modulate,
        gated_residual_layernorm_modulate_ref,
        [case(k, *v) for k, v in SHAPES.items()],
        lambda x, gate, y, shift, scale: plan(x, gate, y, shift, scale, 1e-6),
        tiny=[case("tiny", 16, 96)],
    )
