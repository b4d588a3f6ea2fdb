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
    q_in_ptr,  # [B, L, H*D] each, last dim contiguous, one pair of strides for the three
    k_in_ptr,  # (the three parts of a fused qkv GEMM output, or three separate projections)
    v_in_ptr,
    q_scale_ptr,  # [D]
    k_scale_ptr,  # [D]
    cos_ptr,  # [L, D/2] fp32
    sin_ptr,  # [L, D/2] fp32
    q_ptr,  # [B, H, L_OUT, D] contiguous; this launch writes tokens T_OFF .. T_OFF + L
    k_ptr,
    v_ptr,
    stride_b,
    stride_l,
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
    row_off = b * stride_b + t * stride_l
    if ROPE:
        j = tl.arange(0, HALF)
        cos = tl.load(cos_ptr + t * HALF + j)[None, :]  # [1, HALF]
        sin = tl.load(sin_ptr + t * HALF + j)[None, :]
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < H)[:, None]  # [BLOCK_H, 1]
        src = row_off + h[:, None] * D + d[None, :]  # [BLOCK_H, D]
        dst = ((b * H + h[:, None]) * L_OUT + T_OFF + t) * D + d[None, :]
        for part in tl.static_range(2):  # 0: q, 1: k
            in_ptr = q_in_ptr if part == 0 else k_in_ptr
            scale_ptr = q_scale_ptr if part == 0 else k_scale_ptr
            out_ptr = q_ptr if part == 0 else k_ptr
            norm = Q_NORM if part == 0 else K_NORM
            x = tl.load(in_ptr + src, mask=mask, other=0.0).to(tl.float32)  # whole head rows
            if norm:
                rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # [BLOCK_H]
                x = x * rstd[:, None] * tl.load(scale_ptr + d).to(tl.float32)[None, :]
            if ROPE:  # interleaved pairs (x[2i], x[2i+1]) rotated in registers
                even, odd = tl.split(tl.reshape(x, (BLOCK_H, HALF, 2)))
                x = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK_H, D))
            tl.store(out_ptr + dst, x.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + dst, tl.load(v_in_ptr + src, mask=mask), mask=mask)


def _heads(like: torch.Tensor, num_heads: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New q, k, v [B, H, tokens, D] for the heads of a q (or k, v) projection like [B, L, H*D]."""
    b, _, width = like.shape
    shape = (b, num_heads, tokens, width // num_heads)
    return tuple(torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(3))


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k, v parts ([B, L, H*D] views) of a fused qkv GEMM output [B, L, 3*H*D]."""
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    width = qkv.shape[-1] // 3
    return qkv[..., :width], qkv[..., width : 2 * width], qkv[..., 2 * width :]


def _same_strides(parts):
    """q, k, v with one pair of (batch, token) strides and contiguous rows (the kernel's contract)."""
    if all(p.stride() == parts[0].stride() for p in parts) and parts[0].stride(-1) == 1:
        return parts
    return tuple(p.contiguous() for p in parts)


def plan_parts(parts, q_scale, k_scale, cos, sin, num_heads: int, eps: float, out=None, offset: int = 0) -> Launch:
    """parts: (q, k, v) [B, L, H*D]. q_scale / k_scale None: no norm of q / k (each on its own, as
    the reference); cos / sin None: no RoPE. ``out``: (q, k, v) [B, H, L_out, D] to write tokens
    offset .. offset + L of (joint attention's buffers); new [B, H, L, D] tensors by default."""
    q_in, k_in, v_in = parts = _same_strides(parts)
    b, seq, width = q_in.shape
    head_dim = width // num_heads
    out = _heads(q_in, num_heads, seq) if out is None else out
    q, k, v = out
    rope = cos is not None
    dummy = q_in.new_empty(1, dtype=torch.float32)
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
        (*parts, *scales, *tables, q, k, v, q_in.stride(0), q_in.stride(1), seq, q.shape[2], offset, num_heads, eps),
        {
            "D": head_dim,
            "BLOCK_H": block_h,
            "Q_NORM": q_scale is not None,
            "K_NORM": k_scale is not None,
            "ROPE": rope,
            "num_warps": warps,
        },
        out,
        reads=(*parts, *given, *(tables if rope else ())),
        writes=written,
    )


def plan(
    qkv: torch.Tensor, q_scale, k_scale, cos, sin, num_heads: int, eps: float, out=None, offset: int = 0
) -> Launch:
    """:func:`plan_parts` on the three parts of a fused qkv GEMM output [B, L, 3*H*D]."""
    return plan_parts(split_qkv(qkv), q_scale, k_scale, cos, sin, num_heads, eps, out=out, offset=offset)


def plan_joint_parts(parts_a, parts_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads: int, eps):
    """Both streams of joint attention written into one set of [B, H, La + Lb, D] buffers (the
    torch.cat of q, k and v disappears): two launches of the same kernel."""
    la = parts_a[0].shape[1]
    out = _heads(parts_a[0], num_heads, la + parts_b[0].shape[1])
    rope_a = (cos[:la], sin[:la]) if cos is not None else (None, None)
    rope_b = (cos[la:], sin[la:]) if cos is not None else (None, None)
    return (
        plan_parts(parts_a, a_q_scale, a_k_scale, *rope_a, num_heads, eps, out=out, offset=0),
        plan_parts(parts_b, b_q_scale, b_k_scale, *rope_b, num_heads, eps, out=out, offset=la),
    )


def plan_joint(qkv_a, qkv_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads: int, eps: float):
    """:func:`plan_joint_parts` on two fused qkv GEMM outputs."""
    return plan_joint_parts(
        split_qkv(qkv_a), split_qkv(qkv_b), a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads, eps
    )


def _run_pair(launches):
    first, second = launches
    first()
    return second()


def joint_qk_norm_rope_fwd(qkv_a, qkv_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads, eps):
    return _run_pair(plan_joint(qkv_a, qkv_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads, eps))


def qk_norm_rope_fwd(qkv: torch.Tensor, q_scale, k_scale, cos, sin, num_heads: int, eps: float):
    return plan(qkv, q_scale, k_scale, cos, sin, num_heads, eps)()


def qk_norm_fwd(qkv: torch.Tensor, q_scale, k_scale, num_heads: int, eps: float):
    """SD3 form: RMS qk-norm (or only the split, without scales), no RoPE."""
    return plan(qkv, q_scale, k_scale, None, None, num_heads, eps)()


def qkv_norm_rope_fwd(q, k, v, q_scale, k_scale, cos, sin, num_heads: int, eps: float):
    """Separate q, k, v projections (diffusers' to_q / to_k / to_v), one stream."""
    return plan_parts((q, k, v), q_scale, k_scale, cos, sin, num_heads, eps)()


def joint_qkv_norm_rope_fwd(q_a, k_a, v_a, q_b, k_b, v_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin,
                            num_heads, eps):  # fmt: skip
    """Separate q, k, v projections of both streams of joint attention."""
    launches = plan_joint_parts(
        (q_a, k_a, v_a), (q_b, k_b, v_b), a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads, eps
    )
    return _run_pair(launches)


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
        # the compile backend on diffusers' FLUX: separate to_q / to_k / to_v projections [1, L, 3072]
        txt, img = (tuple(meta(1, n, 3072, dtype=dt) for _ in range(3)) for n in (512, 4096))
        launches = plan_joint_parts(txt, img, s128, s128, s128, s128, cos, cos, 24, 1e-6)
        for name, launch in zip(("txt", "img"), launches, strict=True):
            out.append((f"qkv_norm_rope diffusers-flux joint {name} {short(dt)}", launch))
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
