"""gelu_tanh on the MLP hidden activations (FLUX 4608x12288, single-block mlp part). Eager
F.gelu is already one kernel: the standalone kernel saves nothing; the saving comes when GELU moves
into the up-projection's epilogue (DESIGN.md 3b, item 3). See bench/_ops_common.py."""

import torch
from _ops_common import Case, main

from fastflow.kernels.gelu_tanh import MLP_SHAPES, plan
from fastflow.ops import gelu_tanh
from fastflow.ops.reference import gelu_tanh_ref

SHAPES = MLP_SHAPES  # the shapes the kernel ships for (and the AOT report compiles)


def case(name, tokens, width, e=2):
    n = tokens * width
    return Case(
        name,
        lambda dev, dt: (torch.randn(1, tokens, width, device=dev, dtype=dt),),
        unfused_bytes=2 * n * e,
        unfused_kernels=1,
        flops=10 * n,
    )


if __name__ == "__main__":
    main(
        "gelu_tanh",
        gelu_tanh,
        gelu_tanh_ref,
        [case(k, *v) for k, v in SHAPES.items()],
        lambda x: plan(x, None),
        tiny=[case("tiny", 16, 96)],
    )
