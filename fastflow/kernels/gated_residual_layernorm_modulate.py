"""r = x + gate * y and h = (1 + scale) * LayerNorm(r) + shift in one pass over a token row.

r is rounded to the storage dtype before the statistics, so h equals what the two separate kernels
would give; one read of x and y, two writes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, ROW_SHAPES, Launch, meta, per_sample, row_block, row_warps, short
from .layernorm_modulate import modulated_layernorm


@triton.jit
def gated_residual_row(x_ptr, gate_ptr, y_ptr, r_ptr, row, b, cols, mask, C):
    """r = x + gate * y for one row, stored (rounded to r's dtype) and returned in fp32."""
    x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * C + cols, mask=mask, other=0.0).to(tl.float32)
    r = (x + gate * y).to(r_ptr.dtype.element_ty)
    tl.store(r_ptr + row * C + cols, r, mask=mask)
    return r.to(tl.float32)


@triton.jit
def _gated_residual_layernorm_modulate_fwd_kernel(
    x_ptr,  # [B, L, C], contiguous
    gate_ptr,  # [B, C]
    y_ptr,  # [B, L, C], contiguous
    shift_ptr,  # [B, C]
    scale_ptr,  # [B, C]
    r_ptr,  # [B, L, C] out: the residual stream
    h_ptr,  # [B, L, C] out: the modulated LayerNorm of r
    L,
    C,
    eps,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    r = gated_residual_row(x_ptr, gate_ptr, y_ptr, r_ptr, row, b, cols, mask, C)
    h = modulated_layernorm(r, mask, cols, b, shift_ptr, scale_ptr, C, eps)
    tl.store(h_ptr + row * C + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


def plan(x, gate, y, shift, scale, eps: float) -> Launch:
    b, seq, c = x.shape
    x, y = x.contiguous(), y.contiguous()
    gate, shift, scale = (per_sample(v, b, c, n) for v, n in ((gate, "gate"), (shift, "shift"), (scale, "scale")))
    r, h = torch.empty_like(x), torch.empty_like(x)
    block = row_block(c)
    return Launch(
        _gated_residual_layernorm_modulate_fwd_kernel,
        (b * seq,),
        (x, gate, y, shift, scale, r, h, seq, c, eps),
        {"BLOCK_C": block, "num_warps": row_warps(block)},
        (r, h),
        reads=(x, gate, y, shift, scale),
        writes=(r, h),
    )


def gated_residual_layernorm_modulate_fwd(x, gate, y, shift, scale, eps: float):
    return plan(x, gate, y, shift, scale, eps)()


def shipped(arch: int) -> list[tuple[str, Launch]]:
    out = []
    for name, (rows, c) in ROW_SHAPES.items():
        for dt in DTYPES:
            x, vec = meta(1, rows, c, dtype=dt), meta(1, c, dtype=dt)
            out.append((f"gated_residual_layernorm_modulate {name} {short(dt)}", plan(x, vec, x, vec, vec, 1e-6)))
    return out
