"""qk_norm_rope from the fused qkv GEMM output at FLUX.1 1024x1024 (H 24, D 128). The fused kernel
reads qkv once and writes q, k, v in attention layout. diffusers' eager path, per q and k: upcast,
pow, mean, rsqrt-mul, downcast, weight mul (RMSNorm), then upcast, rotate (unbind/stack/neg), mul
cos, mul sin, add, downcast (RoPE), plus the [B, L, H, D] -> [B, H, L, D] transposes and the
txt/img cat of q, k and v (DESIGN.md 3b). See bench/_ops_common.py."""

import torch
from _ops_common import Case, main

from fastflow.kernels.qk_norm_rope import plan
from fastflow.ops import qk_norm_rope
from fastflow.ops.reference import qk_norm_rope_ref

HEADS, HEAD_DIM = 24, 128
SHAPES = {"flux img 4096 tokens": 4096, "flux txt 512 tokens": 512, "flux single 4608 tokens": 4608}


def _unfused_passes_per_qk(e: int) -> float:
    """Bytes per element of q (or k) moved by the eager sequence, in units of elements * 1 byte."""
    f = 4  # fp32
    rms = (e + f) + (f + f) + f + (f + f) + (f + e) + (e + e + e)  # upcast, pow, mean, mul, downcast, weight
    rope = (e + f) + (f + f) + (f + f) + (f + f) + (f + f + f) + (f + e)  # upcast, rotate, cos, sin, add, down
    return rms + rope + 2 * e + 2 * e  # + transpose to [B, H, L, D], + joint cat


def case(name, tokens, e=2):
    n = tokens * HEADS * HEAD_DIM  # elements of each of q, k, v
    unfused = 2 * _unfused_passes_per_qk(e) * n + (2 * e + 2 * e) * n  # q and k; v: transpose + cat
    return Case(
        name,
        lambda dev, dt: (
            torch.randn(1, tokens, 3 * HEADS * HEAD_DIM, device=dev, dtype=dt),
            torch.ones(HEAD_DIM, device=dev, dtype=dt),
            torch.ones(HEAD_DIM, device=dev, dtype=dt),
            torch.ones(tokens, HEAD_DIM // 2, device=dev),
            torch.zeros(tokens, HEAD_DIM // 2, device=dev),
            HEADS,
            1e-6,
        ),
        unfused_bytes=int(unfused),
        unfused_kernels=26,
        flops=20 * n,
    )


if __name__ == "__main__":
    main(
        "qk_norm_rope",
        qk_norm_rope,
        qk_norm_rope_ref,
        [case(k, v) for k, v in SHAPES.items()],
        plan,
        tiny=[case("tiny", 16)],
    )
