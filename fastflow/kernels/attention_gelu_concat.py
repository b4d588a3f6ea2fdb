"""[merge_heads(attn) | GELU_tanh(mlp)] in one pass, one program per token row: the heads of the
attention output are gathered from [B, H, L, D] and the MLP columns are read straight from linear1's
strided output, so linear2's input is written once (eager: a contiguous copy of the MLP slice, GELU,
the merge_heads copy and torch.cat)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, Launch, meta, short
from .gelu_tanh import gelu_tanh_f32

BLOCK_M = 1024


@triton.jit
def _attention_gelu_concat_fwd_kernel(
    attn_ptr,  # [B, H, L, D], last dim contiguous
    mlp_ptr,  # [B, L, M], last dim contiguous (a column slice of linear1's output)
    out_ptr,  # [B, L, H*D + M], contiguous
    stride_ab,
    stride_ah,
    stride_al,
    stride_mb,
    stride_ml,
    L,
    H,
    M,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    t = row % L
    out_row = out_ptr + row * (H * D + M)
    d = tl.arange(0, D)
    src = attn_ptr + b * stride_ab + t * stride_al + d
    for h in range(H):
        tl.store(out_row + h * D + d, tl.load(src + h * stride_ah))
    cols = tl.arange(0, BLOCK_M)
    mlp_row = mlp_ptr + b * stride_mb + t * stride_ml
    for start in range(0, M, BLOCK_M):
        c = start + cols
        mask = c < M
        x = tl.load(mlp_row + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + H * D + c, gelu_tanh_f32(x).to(out_ptr.dtype.element_ty), mask=mask)


def plan(attn: torch.Tensor, mlp: torch.Tensor) -> Launch:
    b, h, seq, d = attn.shape
    m = mlp.shape[-1]
    if attn.stride(-1) != 1:
        attn = attn.contiguous()
    if mlp.stride(-1) != 1:
        mlp = mlp.contiguous()
    out = torch.empty((b, seq, h * d + m), dtype=attn.dtype, device=attn.device)
    return Launch(
        _attention_gelu_concat_fwd_kernel,
        (b * seq,),
        (attn, mlp, out, attn.stride(0), attn.stride(1), attn.stride(2), mlp.stride(0), mlp.stride(1), seq, h, m),
        {"D": d, "BLOCK_M": min(BLOCK_M, triton.next_power_of_2(m)), "num_warps": 4},
        out,
        reads=(attn, mlp),
        writes=(out,),
    )


def supported(attn: torch.Tensor) -> bool:
    d = attn.shape[-1]
    return d >= 16 and d & (d - 1) == 0  # tl.arange needs a power of two


def attention_gelu_concat_fwd(attn: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    if not supported(attn):  # the op runs its reference (fastflow.ops._registry)
        return NotImplemented
    return plan(attn, mlp)()


# FLUX.1 single blocks at 1024x1024: 4608 tokens, 24 heads x 128, MLP 12288 (a slice of linear1's 21504)
def shipped(arch: int) -> list[tuple[str, Launch]]:
    out = []
    for dt in DTYPES:
        attn = meta(1, 4608, 24, 128, dtype=dt).transpose(1, 2)  # the attention op's [B, L, H, D] layout
        mlp = meta(1, 4608, 21504, dtype=dt)[:, :, 9216:]
        out.append((f"attention_gelu_concat flux single {short(dt)}", plan(attn, mlp)))
    return out
