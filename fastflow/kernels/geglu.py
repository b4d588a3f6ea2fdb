"""GEGLU's gate (SDXL's feed-forward): out = h * GELU(g) with [h | g] the halves of the projection's
last dimension, exact (erf) GELU, fp32 math, one rounding. One pass reads the 2I-wide projection and
writes the I-wide result; the unfused form (chunk, GELU, multiply) writes and re-reads GELU(g) too."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, Launch, meta, short

BLOCK = 1024


@triton.jit
def _geglu_fwd_kernel(
    x_ptr,  # [M, 2I], contiguous: value half, then gate half
    out_ptr,  # [M, I], contiguous
    N,  # M * I
    INNER,  # I
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = offs // INNER
    col = offs - row * INNER
    src = row * (2 * INNER) + col
    h = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + src + INNER, mask=mask, other=0.0).to(tl.float32)
    gelu = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    tl.store(out_ptr + offs, (h * gelu).to(out_ptr.dtype.element_ty), mask=mask)


def plan(x: torch.Tensor) -> Launch:
    x = x.contiguous()
    inner = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], inner)
    n = out.numel()
    return Launch(
        _geglu_fwd_kernel,
        (triton.cdiv(n, BLOCK),),
        (x, out, n, inner),
        {"BLOCK": BLOCK, "num_warps": 4},
        out,
        reads=(x,),
        writes=(out,),
    )


def geglu_fwd(x: torch.Tensor) -> torch.Tensor:
    return plan(x)()


# SDXL's feed-forwards at 1024x1024 (tokens x 2 * inner): level 1 (64^2 tokens, 640 wide), level 2
# and the mid block (32^2 tokens, 1280 wide)
FF_SHAPES = {"sdxl ff 640": (4096, 2 * 2560), "sdxl ff 1280": (1024, 2 * 5120)}


def shipped(arch: int) -> list[tuple[str, Launch]]:
    out = []
    for name, (rows, width) in FF_SHAPES.items():
        for dt in DTYPES:
            out.append((f"geglu {name} {short(dt)}", plan(meta(2, rows, width, dtype=dt))))
    return out
