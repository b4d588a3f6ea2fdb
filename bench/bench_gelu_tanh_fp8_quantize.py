"""gelu_tanh_fp8_quantize on the MLP hidden activations (FLUX 4608x12288, the input of mlp.2): GELU
and per-token FP8 quantization in one pass, against the unfused GELU, then quantize (read bf16,
write bf16, the quantizer reads it back, writes e4m3 and the row scales). See
bench/_ops_common.py."""

import torch
from _ops_common import Case, main

from fastflow.kernels.gelu_fp8_quantize import plan
from fastflow.kernels.gelu_tanh import MLP_SHAPES
from fastflow.ops.fp8 import gelu_tanh_fp8_quantize, gelu_tanh_fp8_quantize_ref

SHAPES = MLP_SHAPES  # the shapes the kernel ships for (and the AOT report compiles)


def case(name, tokens, width, e=2):
    n = tokens * width
    return Case(
        name,
        lambda dev, dt: (torch.randn(tokens, width, device=dev, dtype=dt),),
        unfused_bytes=2 * n * e + n * e + n + 4 * tokens,  # GELU read + write, quantize read + codes + scales
        unfused_kernels=2,
        flops=13 * n,
    )


if __name__ == "__main__":
    main(
        "gelu_tanh_fp8_quantize",
        gelu_tanh_fp8_quantize,
        gelu_tanh_fp8_quantize_ref,
        [case(k, *v) for k, v in SHAPES.items()],
        plan,
        tiny=[case("tiny", 16, 96)],
    )
