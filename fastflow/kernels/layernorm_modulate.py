"""(1 + scale) * LayerNorm(x) + shift in one pass: one program per token row, fp32 statistics."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, ROW_SHAPES, Launch, meta, per_sample, row_block, row_warps, short


@triton.jit
def modulated_layernorm(x, mask, cols, b, shift_ptr, scale_ptr, C, eps):
    """(1 + scale) * LayerNorm(x) + shift for one row x (fp32, masked lanes 0), in fp32; shift and
    scale are row b of [B, C]. Shared by every kernel that ends in a modulated LayerNorm."""
    mean = tl.sum(x, axis=0) / C
    diff = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / C + eps)
    shift = tl.load(shift_ptr + b * C + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * C + cols, mask=mask, other=0.0).to(tl.float32)
    return diff * rstd * (1.0 + scale) + shift


@triton.jit
def _layernorm_modulate_fwd_kernel(
    x_ptr,  # [B, L, C], last dim contiguous
    shift_ptr,  # [B, C], contiguous
    scale_ptr,  # [B, C], contiguous
    out_ptr,  # [B, L, C], contiguous
    stride_xb,
    stride_xl,
    L,
    C,
    eps,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    t = row % L
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(x_ptr + b * stride_xb + t * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    y = modulated_layernorm(x, mask, cols, b, shift_ptr, scale_ptr, C, eps)
    tl.store(out_ptr + row * C + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def plan(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> Launch:
    b, seq, c = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    shift, scale = per_sample(shift, b, c, "shift"), per_sample(scale, b, c, "scale")
    out = torch.empty((b, seq, c), dtype=x.dtype, device=x.device)
    block = row_block(c)
    return Launch(
        _layernorm_modulate_fwd_kernel,
        (b * seq,),
        (x, shift, scale, out, x.stride(0), x.stride(1), seq, c, eps),
        {"BLOCK_C": block, "num_warps": row_warps(block)},
        out,
        reads=(x, shift, scale),
        writes=(out,),
    )


def layernorm_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return plan(x, shift, scale, eps)()


def shipped(arch: int) -> list[tuple[str, Launch]]:
    return [
        (
            f"layernorm_modulate {name} {short(dt)}",
            plan(meta(1, rows, c, dtype=dt), meta(1, c, dtype=dt), meta(1, c, dtype=dt), 1e-6),
        )
        for name, (rows, c) in ROW_SHAPES.items()
        for dt in DTYPES
    ]
