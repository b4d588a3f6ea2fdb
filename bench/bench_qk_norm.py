"""qk_norm (SD3.5: RMS q/k norm, no RoPE) from the fused qkv output at SD3.5-large 1024x1024
(4429 tokens, H 38, D 64). Eager per q and k: upcast, pow, mean, rsqrt-mul, downcast, weight mul,
plus the [B, L, H, D] -> [B, H, L, D] transposes of q, k, v. See bench/_ops_common.py."""

import torch
from _ops_common import Case, main

from fastflow.kernels.qk_norm_rope import plan
from fastflow.ops import qk_norm
from fastflow.ops.reference import qk_norm_ref

HEADS, HEAD_DIM = 38, 64


def case(name, tokens, e=2, heads=HEADS):
    n = tokens * heads * HEAD_DIM
    f = 4
    rms = (e + f) + (f + f) + f + (f + f) + (f + e) + (e + e + e)
    unfused = 2 * (rms + 2 * e) * n + 2 * e * n
    return Case(
        name,
        lambda dev, dt: (
            torch.randn(1, tokens, 3 * heads * HEAD_DIM, device=dev, dtype=dt),
            torch.ones(HEAD_DIM, device=dev, dtype=dt),
            torch.ones(HEAD_DIM, device=dev, dtype=dt),
            heads,
            1e-6,
        ),
        unfused_bytes=int(unfused),
        unfused_kernels=14,
        flops=6 * n,
    )


if __name__ == "__main__":
    main(
        "qk_norm",
        qk_norm,
        qk_norm_ref,
        [case("sd3.5-large 4429 tokens", 4429), case("sd3.5-medium 4429 tokens (H 24)", 4429, heads=24)],
        lambda qkv, qs, ks, heads, eps: plan(qkv, qs, ks, None, None, heads, eps),
        tiny=[case("tiny", 16, heads=2)],
    )
