"""Flash-attention forward (no mask, no dropout): softmax(q k^T * scale) v, online softmax in fp32.

One program per (BLOCK_M query rows, batch x head); K/V streamed in BLOCK_N tiles; exp2 with the
log2(e) factor folded into the scale. Head dim 64 or 128, any sequence lengths (masked tails).
fp32 inputs use IEEE dots (the GPU default would be tf32). Loads use plain pointer tensors, which
compile on Triton 3.8 and 3.9 alike; configs are chosen per architecture (tools/kernel_report.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (compute-capability major, head_dim), checked by
# tools/kernel_report.py for spills and shared memory on sm_80 / sm_89 / sm_90.
# 128x64 tiles at head dim 128 use 255 registers and spill on sm_89 / sm_90, hence 128x32 there.
CONFIGS = {
    (8, 64): (128, 64, 8, 2),
    (8, 128): (128, 32, 8, 2),
    (9, 64): (128, 64, 8, 3),
    (9, 128): (128, 32, 8, 2),
}
DEFAULT = (64, 32, 4, 1)  # interpreter / unknown devices


@triton.jit
def _attention_fwd_kernel(
    q_ptr,  # [B, H, M, D], last dim contiguous
    k_ptr,  # [B, H, N, D], last dim contiguous
    v_ptr,  # [B, H, N, D], last dim contiguous
    o_ptr,  # [B, H, M, D], contiguous
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H,
    M,
    N,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=offs_m[:, None] < M,
        other=0.0,
    )
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=cols[None, :] < N, other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(cols[None, :] < N, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=cols[:, None] < N, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    o_rows = bh * M + offs_m
    tl.store(
        o_ptr + o_rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < M
    )


def config_for(device: torch.device, head_dim: int) -> tuple[int, int, int, int]:
    if device.type != "cuda":
        return DEFAULT
    major = torch.cuda.get_device_capability(device)[0]
    return CONFIGS.get((min(major, 9), head_dim), DEFAULT)


def supported(q: torch.Tensor) -> bool:
    """Shipped (AOT-checked) configurations: head dim 64 / 128 in fp16 / bf16; the rest uses SDPA."""
    return q.shape[-1] in (64, 128) and q.dtype in (torch.float16, torch.bfloat16)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    b, h, m, d = q.shape
    n = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((b, h, m, d), dtype=q.dtype, device=q.device)
    block_m, block_n, warps, stages = config_for(q.device, d)
    sm_scale = scale if scale is not None else d**-0.5
    grid = (triton.cdiv(m, block_m), b * h)
    _attention_fwd_kernel[grid](
        q, k, v, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), h, m, n, sm_scale * 1.4426950408889634,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
