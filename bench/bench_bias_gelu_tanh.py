"""bias_gelu_tanh on the MLP up-projection output of a bias-free GEMM. The baseline here is a
separate bias add then GELU (4 passes); against cuBLAS addmm, whose epilogue already adds the bias,
followed by GELU (2 passes) the fused kernel saves nothing: the remaining win is GELU inside the
GEMM epilogue (DESIGN.md 3b, item 3). See bench/_ops_common.py."""

import torch
from _ops_common import Case, main

from fastflow.kernels.gelu_tanh import MLP_SHAPES, plan
from fastflow.ops import bias_gelu_tanh
from fastflow.ops.reference import bias_gelu_tanh_ref

SHAPES = MLP_SHAPES  # the shapes the kernel ships for (and the AOT report compiles)


def case(name, tokens, width, e=2):
    n = tokens * width
    return Case(
        name,
        lambda dev, dt: (torch.randn(1, tokens, width, device=dev, dtype=dt), torch.randn(width, device=dev, dtype=dt)),
        unfused_bytes=4 * n * e,
        unfused_kernels=2,
        flops=11 * n,
    )


if __name__ == "__main__":
    main(
        "bias_gelu_tanh",
        bias_gelu_tanh,
        bias_gelu_tanh_ref,
        [case(k, *v) for k, v in SHAPES.items()],
        plan,
        tiny=[case("tiny", 16, 96)],
    )
