"""From the fused qkv GEMM output: RMSNorm q and k per head, FLUX interleaved RoPE, write q, k, v
in [B, H, L, D] for attention. One program per (token row, head); RoPE tables in fp32.

ROPE = False gives the SD3 variant (RMS qk-norm only); without Q_NORM / K_NORM q / k are only split (SD3-medium).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, Launch, meta, short


@triton.jit
def _qk_norm_rope_fwd_kernel(
    qkv_ptr,  # [B, L, 3*H*D], last dim contiguous
    q_scale_ptr,  # [D]
    k_scale_ptr,  # [D]
    cos_ptr,  # [L, D/2] fp32
    sin_ptr,  # [L, D/2] fp32
    q_ptr,  # [B, H, L, D] contiguous
    k_ptr,
    v_ptr,
    stride_qkv_b,
    stride_qkv_l,
    L,
    H,
    eps,
    D: tl.constexpr,
    Q_NORM: tl.constexpr,
    K_NORM: tl.constexpr,
    ROPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * L + l
    h = tl.program_id(1).to(tl.int64)
    b = row // L
    t = row % L
    HALF: tl.constexpr = D // 2
    j = tl.arange(0, HALF)
    src = qkv_ptr + b * stride_qkv_b + t * stride_qkv_l + h * D
    dst = ((b * H + h) * L + t) * D
    if ROPE:
        cos = tl.load(cos_ptr + t * HALF + j)
        sin = tl.load(sin_ptr + t * HALF + j)
    for part in tl.static_range(2):  # 0: q, 1: k
        scale_ptr = q_scale_ptr if part == 0 else k_scale_ptr
        out_ptr = q_ptr if part == 0 else k_ptr
        norm = Q_NORM if part == 0 else K_NORM
        even = tl.load(src + part * H * D + 2 * j).to(tl.float32)
        odd = tl.load(src + part * H * D + 2 * j + 1).to(tl.float32)
        if norm:
            rstd = 1.0 / tl.sqrt((tl.sum(even * even, axis=0) + tl.sum(odd * odd, axis=0)) / D + eps)
            even = even * rstd * tl.load(scale_ptr + 2 * j).to(tl.float32)
            odd = odd * rstd * tl.load(scale_ptr + 2 * j + 1).to(tl.float32)
        if ROPE:
            even, odd = even * cos - odd * sin, even * sin + odd * cos
        tl.store(out_ptr + dst + 2 * j, even.to(out_ptr.dtype.element_ty))
        tl.store(out_ptr + dst + 2 * j + 1, odd.to(out_ptr.dtype.element_ty))
    d = tl.arange(0, D)
    tl.store(v_ptr + dst + d, tl.load(src + 2 * H * D + d))


def plan(qkv: torch.Tensor, q_scale, k_scale, cos, sin, num_heads: int, eps: float) -> Launch:
    """q_scale / k_scale None: no norm of q / k (each on its own, as the reference); cos / sin None:
    no RoPE."""
    b, seq, width = qkv.shape
    head_dim = width // (3 * num_heads)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q, k, v = (torch.empty((b, num_heads, seq, head_dim), dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    rope = cos is not None
    dummy = qkv.new_empty(1, dtype=torch.float32)
    given = tuple(s for s in (q_scale, k_scale) if s is not None)
    scales = tuple(dummy if s is None else s for s in (q_scale, k_scale))
    tables = (cos.contiguous(), sin.contiguous()) if rope else (dummy, dummy)
    return Launch(
        _qk_norm_rope_fwd_kernel,
        (b * seq, num_heads),
        (qkv, *scales, *tables, q, k, v, qkv.stride(0), qkv.stride(1), seq, num_heads, eps),
        {
            "D": head_dim,
            "Q_NORM": q_scale is not None,
            "K_NORM": k_scale is not None,
            "ROPE": rope,
            "num_warps": 1 if head_dim <= 64 else 2,
        },
        (q, k, v),
        reads=(qkv, *given, *(tables if rope else ())),
        writes=(q, k, v),
    )


def qk_norm_rope_fwd(qkv: torch.Tensor, q_scale, k_scale, cos, sin, num_heads: int, eps: float):
    return plan(qkv, q_scale, k_scale, cos, sin, num_heads, eps)()


def qk_norm_fwd(qkv: torch.Tensor, q_scale, k_scale, num_heads: int, eps: float):
    """SD3 form: RMS qk-norm (or only the split, without scales), no RoPE."""
    return plan(qkv, q_scale, k_scale, None, None, num_heads, eps)()


def shipped(arch: int) -> list[tuple[str, Launch]]:
    out = []
    for dt in DTYPES:
        s128, s64 = meta(128, dtype=dt), meta(64, dtype=dt)
        for name, tokens in (("flux img", 4096), ("flux txt", 512)):
            cos = meta(tokens, 64, dtype=torch.float32)
            out.append(
                (
                    f"qk_norm_rope {name} {short(dt)}",
                    plan(meta(1, tokens, 9216, dtype=dt), s128, s128, cos, cos, 24, 1e-6),
                )
            )
        # FLUX single blocks hand over the qkv slice of linear1's output [qkv | mlp] (row stride 21504)
        fused = meta(1, 4608, 9216 + 12288, dtype=dt)[..., :9216]
        cos = meta(4608, 64, dtype=torch.float32)
        out.append((f"qk_norm_rope flux single {short(dt)}", plan(fused, s128, s128, cos, cos, 24, 1e-6)))
        for name, tokens in (("sd3.5-large x", 4096), ("sd3.5-large ctx", 333)):
            out.append(
                (
                    f"qk_norm {name} {short(dt)}",
                    plan(meta(1, tokens, 3 * 2432, dtype=dt), s64, s64, None, None, 38, 1e-6),
                )
            )
        out.append(
            (
                f"qk_norm split sd3-medium {short(dt)}",
                plan(meta(1, 4096, 3 * 1536, dtype=dt), None, None, None, None, 24, 1e-6),
            )
        )
    return out
