"""GELU (tanh) fused with per-token FP8 e4m3 quantization, one program per row: the MLP's hidden
activation goes from the up-projection's output straight to the codes and row scales the
down-projection (FLUX mlp.2) reads, without the bf16 activation's round trip through memory.

The GELU output is rounded to the model dtype before quantizing, as the unfused path (the
gelu_tanh kernel, then fp8_quantize) stores it, so fused and unfused give the same bits; NaN and
Inf propagate as in the quantizer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, Launch, meta, row_block, row_warps, short
from .fp8_quantize import _quantize_row, native
from .gelu_tanh import MLP_SHAPES, gelu_tanh_f32


@triton.jit
def _gelu_tanh_fp8_quantize_fwd_kernel(
    x_ptr,  # [M, K], last dim contiguous
    q_ptr,  # [M, K] e4m3, contiguous
    scale_ptr,  # [M] fp32 out
    stride_xm,
    K,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    h = gelu_tanh_f32(x).to(x_ptr.dtype.element_ty).to(tl.float32)  # as the unfused path stores it
    _quantize_row(h, mask, q_ptr + row * K + cols, scale_ptr, row, False)


def plan(x: torch.Tensor) -> Launch:
    """x [M, K] -> (q [M, K] e4m3, scale [M] fp32)."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    block = row_block(k)
    return Launch(
        _gelu_tanh_fp8_quantize_fwd_kernel,
        (m,),
        (x, q, scale, x.stride(0), k),
        {"BLOCK_K": block, "num_warps": row_warps(block)},
        (q, scale),
        reads=(x,),
        writes=(q, scale),
    )


def gelu_tanh_fp8_quantize_fwd(x: torch.Tensor):
    if not native(x):
        return NotImplemented
    return plan(x)()


def shipped(arch: int) -> list[tuple[str, Launch]]:
    if arch < 89:  # no e4m3 conversion: FP8 layers are dequantized at load below sm_89
        return []
    return [
        (f"gelu_tanh_fp8_quantize {name} {short(dt)}", plan(meta(rows, width, dtype=dt)))
        for name, (rows, width) in MLP_SHAPES.items()
        for dt in DTYPES
    ]
