"""geglu on SDXL's feed-forward projections at 1024x1024 (level 1: 4096 tokens x 2 x 2560; level 2
and mid: 1024 x 2 x 5120). Unfused (eager diffusers / sgm): chunk, F.gelu(gate) writes I, the
multiply reads h and GELU(gate) and writes I: 2 kernels, reads 3I + writes 2I per token; fused: reads
2I, writes I. See bench/_ops_common.py."""

import torch
from _ops_common import Case, main

from fastflow.kernels.geglu import FF_SHAPES, plan
from fastflow.ops import geglu
from fastflow.ops.reference import geglu_ref

SHAPES = FF_SHAPES  # the shapes the kernel ships for (and the AOT report compiles)


def case(name, tokens, width, e=2):
    inner = width // 2
    return Case(
        name,
        lambda dev, dt: (torch.randn(2, tokens, width, device=dev, dtype=dt),),
        unfused_bytes=2 * tokens * 5 * inner * e,
        unfused_kernels=2,
        flops=2 * tokens * 12 * inner,
    )


if __name__ == "__main__":
    main("geglu", geglu, geglu_ref, [case(k, *v) for k, v in SHAPES.items()], plan, tiny=[case("tiny", 16, 128)])
