"""x + gate * y with a per-sample gate: one program per token row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, ROW_SHAPES, Launch, meta, per_sample, row_block, row_warps, short


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


def plan(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> Launch:
    b, seq, c = x.shape
    x, y, gate = x.contiguous(), y.contiguous(), per_sample(gate, b, c, "gate")
    out = torch.empty_like(x)
    block = row_block(c)
    return Launch(
        _gated_residual_fwd_kernel,
        (b * seq,),
        (x, gate, y, out, seq, c),
        {"BLOCK_C": block, "num_warps": row_warps(block)},
        out,
        reads=(x, gate, y),
        writes=(out,),
    )


def gated_residual_fwd(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return plan(x, gate, y)()


def shipped(arch: int) -> list[tuple[str, Launch]]:
    return [
        (
            f"gated_residual {name} {short(dt)}",
            plan(meta(1, rows, c, dtype=dt), meta(1, c, dtype=dt), meta(1, rows, c, dtype=dt)),
        )
        for name, (rows, c) in ROW_SHAPES.items()
        for dt in DTYPES
    ]
