"""gated_residual_layernorm_modulate at FLUX.1 / SD3.5 sub-block boundaries. Eager: gate * y,
x + t (2 kernels), then LayerNorm, (1 + scale) *, + shift (3 kernels), re-reading r; fused: read x
and y once, write r and h. See bench/_ops_common.py."""

import torch
from _ops_common import Case, main

from fastflow.ops import gated_residual_layernorm_modulate
from fastflow.ops.reference import gated_residual_layernorm_modulate_ref

SHAPES = {"flux img 4096x3072": (4096, 3072), "sd3.5-large 4429x2432": (4429, 2432)}


def case(name, tokens, width, e=2):
    n = tokens * width

    def make(dev, dt):
        x, y = (torch.randn(1, tokens, width, device=dev, dtype=dt) for _ in range(2))
        gate, shift, scale = (torch.randn(1, width, device=dev, dtype=dt) for _ in range(3))
        return x, gate, y, shift, scale

    return Case(name, make, fused_bytes=4 * n * e, unfused_bytes=11 * n * e, unfused_kernels=5, flops=10 * n)


if __name__ == "__main__":
    main(
        "gated_residual_layernorm_modulate",
        gated_residual_layernorm_modulate,
        gated_residual_layernorm_modulate_ref,
        [case(k, *v) for k, v in SHAPES.items()],
    )
