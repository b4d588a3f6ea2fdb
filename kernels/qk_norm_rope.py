"""From the fused qkv GEMM output: RMSNorm q and k per head, FLUX interleaved RoPE, write q, k, v
in [B, H, L, D] for attention. One program per token row, over its heads in [BLOCK_H, D] tiles of
whole head rows (contiguous, 128-bit accesses for 16-bit types); the interleaved RoPE pairs are
split and joined in registers. RoPE tables in fp32.

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
    q_ptr,  # [B, H, L_OUT, D] contiguous; this launch writes tokens T_OFF .. T_OFF + L
    k_ptr,
    v_ptr,
    stride_qkv_b,
    stride_qkv_l,
    L,
    L_OUT,  # tokens of the outputs (joint attention: both streams'; else L)
    T_OFF,  # this stream's first token in them
    H,
    eps,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,  # heads per tile: BLOCK_H x D elements, 8 per thread (128-bit for 16-bit types)
    Q_NORM: tl.constexpr,
    K_NORM: tl.constexpr,
    ROPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * L + l
    b = row // L
    t = row % L
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, D)
    src_row = qkv_ptr + b * stride_qkv_b + t * stride_qkv_l
    if ROPE:
        j = tl.arange(0, HALF)
        cos = tl.load(cos_ptr + t * HALF + j)[None, :]  # [1, HALF]
        sin = tl.load(sin_ptr + t * HALF + j)[None, :]
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < H)[:, None]  # [BLOCK_H, 1]
        src = src_row + h[:, None] * D + d[None, :]  # [BLOCK_H, D]
        dst = ((b * H + h[:, None]) * L_OUT + T_OFF + t) * D + d[None, :]
        for part in tl.static_range(2):  # 0: q, 1: k
            scale_ptr = q_scale_ptr if part == 0 else k_scale_ptr
            out_ptr = q_ptr if part == 0 else k_ptr
            norm = Q_NORM if part == 0 else K_NORM
            x = tl.load(src + part * H * D, mask=mask, other=0.0).to(tl.float32)  # whole head rows
            if norm:
                rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # [BLOCK_H]
                x = x * rstd[:, None] * tl.load(scale_ptr + d).to(tl.float32)[None, :]
            if ROPE:  # interleaved pairs (x[2i], x[2i+1]) rotated in registers
                even, odd = tl.split(tl.reshape(x, (BLOCK_H, HALF, 2)))
                x = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK_H, D))
            tl.store(out_ptr + dst, x.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + dst, tl.load(src + 2 * H * D, mask=mask), mask=mask)


def _heads(qkv: torch.Tensor, num_heads: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New q, k, v [B, H, tokens, D] for the heads of qkv [B, L, 3*H*D]."""
    b, _, width = qkv.shape
    shape = (b, num_heads, tokens, width // (3 * num_heads))
    return tuple(torch.empty(shape, dtype=qkv.dtype, device=qkv.device) for _ in range(3))


def plan(
    qkv: torch.Tensor, q_scale, k_scale, cos, sin, num_heads: int, eps: float, out=None, offset: int = 0
) -> Launch:
    """q_scale / k_scale None: no norm of q / k (each on its own, as the reference); cos / sin None:
    no RoPE. ``out``: (q, k, v) [B, H, L_out, D] to write tokens offset .. offset + L of (joint
    attention's buffers); new [B, H, L, D] tensors by default."""
    b, seq, width = qkv.shape
    head_dim = width // (3 * num_heads)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    out = _heads(qkv, num_heads, seq) if out is None else out
    q, k, v = out
    rope = cos is not None
    dummy = qkv.new_empty(1, dtype=torch.float32)
    given = tuple(s for s in (q_scale, k_scale) if s is not None)
    scales = tuple(dummy if s is None else s for s in (q_scale, k_scale))
    tables = (cos.contiguous(), sin.contiguous()) if rope else (dummy, dummy)
    # about 1024 elements per tile, 8 per thread, within the heads there are
    block_h = max(1, min(triton.next_power_of_2(num_heads), 1024 // head_dim))
    warps = max(1, min(4, block_h * head_dim // 256))
    written = tuple(t[:, :, offset : offset + seq] for t in out)  # for the byte count
    return Launch(
        _qk_norm_rope_fwd_kernel,
        (b * seq,),
        (qkv, *scales, *tables, q, k, v, qkv.stride(0), qkv.stride(1), seq, q.shape[2], offset, num_heads, eps),
        {
            "D": head_dim,
            "BLOCK_H": block_h,
            "Q_NORM": q_scale is not None,
            "K_NORM": k_scale is not None,
            "ROPE": rope,
            "num_warps": warps,
        },
        out,
        reads=(qkv, *given, *(tables if rope else ())),
        writes=written,
    )


def plan_joint(qkv_a, qkv_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads: int, eps: float):
    """Both streams of joint attention written into one set of [B, H, La + Lb, D] buffers (the
    torch.cat of q, k and v disappears): two launches of the same kernel."""
    la = qkv_a.shape[1]
    out = _heads(qkv_a, num_heads, la + qkv_b.shape[1])
    rope_a = (cos[:la], sin[:la]) if cos is not None else (None, None)
    rope_b = (cos[la:], sin[la:]) if cos is not None else (None, None)
    return (
        plan(qkv_a, a_q_scale, a_k_scale, *rope_a, num_heads, eps, out=out, offset=0),
        plan(qkv_b, b_q_scale, b_k_scale, *rope_b, num_heads, eps, out=out, offset=la),
    )


def joint_qk_norm_rope_fwd(qkv_a, qkv_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads, eps):
    first, second = plan_joint(qkv_a, qkv_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads, eps)
    first()
    return second()


def qk_norm_rope_fwd(qkv: torch.Tensor, q_scale, k_scale, cos, sin, num_heads: int, eps: float):
    return plan(qkv, q_scale, k_scale, cos, sin, num_heads, eps)()


def qk_norm_fwd(qkv: torch.Tensor, q_scale, k_scale, num_heads: int, eps: float):
    """SD3 form: RMS qk-norm (or only the split, without scales), no RoPE."""
    return plan(qkv, q_scale, k_scale, None, None, num_heads, eps)()


def shipped(arch: int) -> list[tuple[str, Launch]]:
    out = []
    for dt in DTYPES:
        s128, s64 = meta(128, dtype=dt), meta(64, dtype=dt)
        # FLUX double blocks: txt (512) and img (4096) into one [1, 24, 4608, 128] set of buffers
        cos = meta(4608, 64, dtype=torch.float32)
        txt, img = meta(1, 512, 9216, dtype=dt), meta(1, 4096, 9216, dtype=dt)
        for name, launch in zip(
            ("txt", "img"), plan_joint(txt, img, s128, s128, s128, s128, cos, cos, 24, 1e-6), strict=True
        ):
            out.append((f"qk_norm_rope flux joint {name} {short(dt)}", launch))
        # FLUX single blocks hand over the qkv slice of linear1's output [qkv | mlp] (row stride 21504)
        fused = meta(1, 4608, 9216 + 12288, dtype=dt)[..., :9216]
        cos = meta(4608, 64, dtype=torch.float32)
        out.append((f"qk_norm_rope flux single {short(dt)}", plan(fused, s128, s128, cos, cos, 24, 1e-6)))
        ctx, x = meta(1, 333, 3 * 2432, dtype=dt), meta(1, 4096, 3 * 2432, dtype=dt)
        for name, launch in zip(
            ("ctx", "x"), plan_joint(ctx, x, s64, s64, s64, s64, None, None, 38, 1e-6), strict=True
        ):
            out.append((f"qk_norm sd3.5-large joint {name} {short(dt)}", launch))
        out.append(
            (
                f"qk_norm split sd3-medium {short(dt)}",
                plan(meta(1, 4096, 3 * 1536, dtype=dt), None, None, None, None, 24, 1e-6),
            )
        )
    return out
