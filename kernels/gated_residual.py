"""x + gate * y with a per-sample gate: one program per token row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import row_block, row_warps


@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr,  # [B, L, C], contiguous
    gate_ptr,  # [B, C], contiguous
    y_ptr,  # [B, L, C], contiguous
    out_ptr,  # [B, L, C], contiguous
    L,
    C,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * C + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * C + cols, (x + gate * y).to(out_ptr.dtype.element_ty), mask=mask)


def gated_residual_fwd(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    b, seq, c = x.shape
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    block = row_block(c)
    _gated_residual_fwd_kernel[(b * seq,)](
        x, gate.contiguous(), y, out, seq, c, BLOCK_C=block, num_warps=row_warps(block)
    )
    return out
