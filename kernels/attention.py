"""Flash-attention forward (no mask, no dropout): softmax(q k^T * scale) v, online softmax in fp32.

One program per (BLOCK_M query rows, batch x head); K/V streamed in BLOCK_N tiles; exp2 with the
log2(e) factor folded into the scale. Head dim 64 or 128, any sequence lengths: tiles are read
and written through 4-D tensor descriptors whose bounds are per (batch, head), so ragged tails
read zeros and are not written (TMA on sm_90). fp32 inputs use IEEE dots (the GPU default would
be tf32). Configs are chosen per architecture (tools/kernel_report.py).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from ._common import Launch, arch_family, device_arch, ensure_allocator, meta, short

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (compute-capability major, head_dim), checked by
# tools/kernel_report.py for spills and shared memory on sm_80 / sm_89 / sm_90. Measured with
# Triton 3.9 at FLUX's 4608 tokens (registers, spills, shared memory):
#   sm_90 D=128: 128x32 w8 s2 114/0/64 KB, 128x64 w8 s2 138/0/96 KB, 128x128 w8 s2 188/0/160 KB,
#                128x128 w4 spills 2268 B -> 128x128 w8 s2 (the Triton tutorial's Hopper tile);
#   sm_90 D=64:  128x128 w8 s3 155/0/112 KB;
#   sm_89 D=128: 128x64 w8 s2 210/0/64 KB; s3 and 128x128 spill (32-360 B) -> 128x64 w8 s2;
#   sm_89 D=64:  128x64 w8 s2 148/0; 128x32 w8 s2 spills 12 B. sm_80 follows sm_89 (207 / 146 regs).
# Which tile is fastest is for a GPU to say (bench/bench_attention.py); these are the largest that
# compile cleanly, so each K/V tile feeds the widest wgmma / mma per online-softmax rescale.
CONFIGS = {
    (8, 64): (128, 64, 8, 2),
    (8, 128): (128, 64, 8, 2),
    (9, 64): (128, 128, 8, 3),
    (9, 128): (128, 128, 8, 2),
    (10, 64): (128, 128, 8, 3),  # sm_100 (tcgen05): the sm_90 tiles compile without spills
    (10, 128): (128, 128, 8, 2),
}
_log = logging.getLogger(__name__)
DEFAULT = (64, 32, 4, 1)  # interpreter / unknown devices


@triton.jit
def _attention_fwd_kernel(
    q_ptr,  # [B, H, M, D], last dim contiguous, other strides 16-byte aligned
    k_ptr,  # [B, H, N, D]
    v_ptr,  # [B, H, N, D]
    o_ptr,  # [B, H, M, D], contiguous
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    B,
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
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    # 4-D tensor descriptors: bounds are per (batch, head), so tails read zeros (TMA on sm_90)
    q_desc = tl.make_tensor_descriptor(
        q_ptr,
        shape=[B, H, M, HEAD_DIM],
        strides=[stride_qb, stride_qh, stride_qm, 1],
        block_shape=[1, 1, BLOCK_M, HEAD_DIM],
    )
    k_desc = tl.make_tensor_descriptor(
        k_ptr,
        shape=[B, H, N, HEAD_DIM],
        strides=[stride_kb, stride_kh, stride_kn, 1],
        block_shape=[1, 1, BLOCK_N, HEAD_DIM],
    )
    v_desc = tl.make_tensor_descriptor(
        v_ptr,
        shape=[B, H, N, HEAD_DIM],
        strides=[stride_vb, stride_vh, stride_vn, 1],
        block_shape=[1, 1, BLOCK_N, HEAD_DIM],
    )
    o_desc = tl.make_tensor_descriptor(
        o_ptr,
        shape=[B, H, M, HEAD_DIM],
        strides=[H * M * HEAD_DIM, M * HEAD_DIM, HEAD_DIM, 1],
        block_shape=[1, 1, BLOCK_M, HEAD_DIM],
    )
    start_m = pid_m * BLOCK_M
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        k = k_desc.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        if IEEE:
            s = tl.dot(q, k.T, input_precision="ieee")
        else:
            s = tl.dot(q, k.T)
        s = tl.where((start + offs_n)[None, :] < N, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = v_desc.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    o_desc.store([b, h, start_m, 0], out.to(o_desc.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))


def config_for(device: torch.device, head_dim: int, arch: int | None = None) -> tuple[int, int, int, int]:
    """The tile config for ``arch`` (e.g. 90), or the device's; DEFAULT off CUDA."""
    if arch is None:
        if device.type != "cuda":
            return DEFAULT
        arch = device_arch(device)
    return CONFIGS.get((arch_family(arch), head_dim), DEFAULT)


def supported(q: torch.Tensor) -> bool:
    """Shipped (AOT-checked) configurations: head dim 64 / 128 in fp16 / bf16; the rest uses SDPA."""
    return q.shape[-1] in (64, 128) and q.dtype in (torch.float16, torch.bfloat16)


def tma_ready(t: torch.Tensor) -> bool:
    """TMA descriptors need 16-byte aligned base addresses and strides (the last dim contiguous,
    which plan() ensures by copying)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in t.stride()[:-1])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """The op's Triton implementation: the kernel for its shipped head dims / dtypes, torch SDPA
    (flash / mem-efficient) otherwise (e.g. the VAE's head dim 512, or views TMA cannot address)."""
    if supported(q) and k.dtype == v.dtype == q.dtype and all(tma_ready(t) for t in (q, k, v) if t.stride(-1) == 1):
        return attention_fwd(q, k, v, scale)
    if supported(q):
        _log.debug("attention: inputs not 16-byte aligned for TMA; running torch SDPA")
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, arch: int | None = None) -> Launch:
    b, h, m, d = q.shape
    n = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((b, h, m, d), dtype=q.dtype, device=q.device)
    block_m, block_n, warps, stages = config_for(q.device, d, arch)
    sm_scale = scale if scale is not None else d**-0.5
    return Launch(
        _attention_fwd_kernel,
        (triton.cdiv(m, block_m), b * h),
        (q, k, v, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
         v.stride(0), v.stride(1), v.stride(2), b, h, m, n, sm_scale * 1.4426950408889634),
        {"HEAD_DIM": d, "BLOCK_M": block_m, "BLOCK_N": block_n, "IEEE": q.dtype == torch.float32,
         "num_warps": warps, "num_stages": stages},
        out,
        reads=(q, k, v),
        writes=(out,),
    )  # fmt: skip


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    launch = plan(q, k, v, scale)
    ensure_allocator(q.device)
    return launch()


# (heads, head dim, tokens) at 1024x1024: FLUX.1 joint attention, SD3.5-large, SD3.5-medium attn2
ATTENTION_SHAPES = {"flux": (24, 128, 4608), "sd3.5-large": (38, 64, 4429), "sd3.5-medium attn2": (24, 64, 4096)}


def shipped(arch: int) -> list[tuple[str, Launch]]:
    out = []
    for name, (heads, d, tokens) in ATTENTION_SHAPES.items():
        for dt in (torch.bfloat16, torch.float16):
            # q, k, v as qk_norm_rope / qk_norm write them and torch.cat joins them: contiguous [B, H, L, D]
            q = meta(1, heads, tokens, d, dtype=dt)
            launch = plan(q, q, q, None, arch)
            bm, bn, w, s = (launch.meta[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
            out.append((f"attention {name} D={d} {bm}x{bn} w{w} s{s} {short(dt)}", launch))
    return out
