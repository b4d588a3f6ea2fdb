"""attention (flash forward) at the shapes the kernel ships for: FLUX.1 1024x1024 (L 4608, H 24,
D 128), SD3.5-large (L 4429, H 38, D 64) and SD3.5-medium's attn2 (L 4096, H 24, D 64). Eager SDPA
on a GPU is already a fused flash kernel, so the unfused baseline here is the math path that
materialises the L x L scores (what SDPA falls back to when no fused kernel applies). Target on an
H100: >= 550 TFLOP/s bf16 at D 128, L 4608. See bench/_ops_common.py."""

import torch
from _ops_common import Case, main

from fastflow.kernels.attention import ATTENTION_SHAPES, plan
from fastflow.ops import attention
from fastflow.ops.reference import attention_ref

SHAPES = ATTENTION_SHAPES  # name -> (heads, head dim, tokens)


def case(name, heads, dim, seq, e=2):
    qkvo = 4 * seq * heads * dim * e
    scores = seq * seq * heads * e  # one L x L matrix per head, written and read by each step
    return Case(
        name,
        lambda dev, dt: tuple(torch.randn(1, heads, seq, dim, device=dev, dtype=dt) for _ in range(3)),
        unfused_bytes=qkvo + 2 * 3 * scores,
        unfused_kernels=3,
        flops=4 * seq * seq * heads * dim,
    )


if __name__ == "__main__":
    main(
        "attention",
        attention,
        attention_ref,
        [case(k, *v) for k, v in SHAPES.items()],
        lambda q, k, v: plan(q, k, v, None),
        tiny=[case("tiny", 2, 32, 64)],
    )
