"""layernorm_modulate at the real shapes: FLUX.1 1024x1024 (4096 image + 512 text tokens, D 3072),
SD3.5-large (4429 tokens incl. 333 text, D 2432), SD3.5-medium (D 1536). See bench/_ops_common.py."""

import torch
from _ops_common import Case, main

from fastflow.kernels._common import ROW_SHAPES
from fastflow.kernels.layernorm_modulate import plan
from fastflow.ops import layernorm_modulate
from fastflow.ops.reference import layernorm_modulate_ref

SHAPES = ROW_SHAPES  # the shapes the kernel ships for (and the AOT report compiles)


def case(name, tokens, width, e=2):
    n = tokens * width
    # eager: LayerNorm (R x, W) -> (1 + scale) * (R, W) -> + shift (R, W); fused: R x, W out
    return Case(
        name,
        lambda dev, dt: (
            torch.randn(1, tokens, width, device=dev, dtype=dt),
            torch.randn(1, width, device=dev, dtype=dt),
            torch.randn(1, width, device=dev, dtype=dt),
        ),
        unfused_bytes=6 * n * e,
        unfused_kernels=3,
        flops=8 * n,
    )


if __name__ == "__main__":
    main(
        "layernorm_modulate",
        layernorm_modulate,
        layernorm_modulate_ref,
        [case(k, *v) for k, v in SHAPES.items()],
        lambda x, shift, scale: plan(x, shift, scale, 1e-6),
        tiny=[case("tiny", 16, 96)],
    )
