"""Flash-attention forward (no mask, no dropout): softmax(q k^T * scale) v, online softmax in fp32.

One tile = BLOCK_M query rows of one (batch, head); K/V streamed in BLOCK_N tiles through an
unmasked main loop and one masked tail; exp2 with log2(e) folded into the scale; ``acc = dot(p, v,
acc)``. The output is written as [B, L, H, D] (so merging heads is a view), returned as its
[B, H, L, D] view. Two load paths: host tensor descriptors (TMA; sm_90 / sm_100), 4-D over
[B, H, L, D] so the bounds are per (batch, head) and ragged tails read zeros (a 2-D descriptor over
[B*H*L, D], as in the Triton tutorial, would read the next head's rows there), or pointer loads
with masks (sm_80 / 89 / 120; 128-bit vectors). A persistent variant (one program per SM walking
the tiles) where it compiles cleanly. fp32 inputs use IEEE dots (the GPU default would be tf32).
Which implementation runs on a GPU (this kernel and its variants, FlashAttention-3, cuDNN, torch's
flash) is measured there by ``fastflow tune`` (fastflow/ops/attention_backends.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import Launch, arch_family, device_arch, meta, short

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (compute-capability major, head_dim), checked by
# tools/kernel_report.py for spills and shared memory on sm_80 / sm_89 / sm_90. Measured with
# Triton 3.9 at FLUX's 4608 tokens (registers, spills, shared memory):
#   sm_90 D=128: 128x32 w8 s2 114/0/64 KB, 128x64 w8 s2 138/0/96 KB, 128x128 w8 s2 188/0/160 KB,
#                128x128 w4 spills 2268 B -> 128x128 w8 s2 (the Triton tutorial's Hopper tile);
#                tl.range(warp_specialize=True): 128x128 w4 spills 2816 B, w8 compiles to the same
#                187 registers as without it (no effect seen for sm_90 in Triton 3.9), so not used;
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
DEFAULT = (64, 32, 4, 1)  # interpreter / unknown devices


@triton.jit
def _load_rows(
    src, b, h, start, stride_b, stride_h, stride_l, L,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    """Rows start.. start+BLOCK of head (b, h) as [BLOCK, HEAD_DIM]: through the TMA descriptor
    (its per-head bounds read zeros past L), or by pointers (rows past L masked to zero)."""
    if TMA:
        x = src.load([b, h, start, 0]).reshape(BLOCK, HEAD_DIM)
    else:
        rows = start + tl.arange(0, BLOCK)
        base = src + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
        ptrs = base + rows.to(tl.int64)[:, None] * stride_l + tl.arange(0, HEAD_DIM)[None, :]
        if MASK:
            x = tl.load(ptrs, mask=rows[:, None] < L, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _attention_tile(
    q_src, k_src, v_src, o_dst, tile,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, M, N, num_m, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    # tiles of one (batch, head) are consecutive, so its K/V stay in L2 across the query tiles
    bh = tile // num_m
    start_m = (tile % num_m) * BLOCK_M
    b = bh // H
    h = bh % H
    q = _load_rows(q_src, b, h, start_m, stride_qb, stride_qh, stride_qm, M, BLOCK_M, HEAD_DIM, TMA, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    # main loop over whole K/V tiles: no masks
    for start in range(0, n_full, BLOCK_N):
        k = _load_rows(k_src, b, h, start, stride_kb, stride_kh, stride_kn, N, BLOCK_N, HEAD_DIM, TMA, False)
        v = _load_rows(v_src, b, h, start, stride_vb, stride_vh, stride_vn, N, BLOCK_N, HEAD_DIM, TMA, False)
        acc, l_i, m_i = _attention_step(q, k, v, acc, l_i, m_i, start, N, qk_scale, BLOCK_N, IEEE, False)
    if n_full < N:  # the ragged tail: K/V rows past N read as zeros, their scores masked to -inf
        k = _load_rows(k_src, b, h, n_full, stride_kb, stride_kh, stride_kn, N, BLOCK_N, HEAD_DIM, TMA, True)
        v = _load_rows(v_src, b, h, n_full, stride_vb, stride_vh, stride_vn, N, BLOCK_N, HEAD_DIM, TMA, True)
        acc, l_i, m_i = _attention_step(q, k, v, acc, l_i, m_i, n_full, N, qk_scale, BLOCK_N, IEEE, True)
    out = acc / l_i[:, None]
    # the [B, M, H, D] output: head h's D columns of rows start_m.. of batch b (rows past M not written)
    if TMA:
        o_dst.store([b, start_m, h * HEAD_DIM], out.to(o_dst.dtype).reshape(1, BLOCK_M, HEAD_DIM))
    else:
        rows = start_m + tl.arange(0, BLOCK_M)
        base = o_dst + b.to(tl.int64) * M * H * HEAD_DIM + h * HEAD_DIM
        ptrs = base + rows.to(tl.int64)[:, None] * (H * HEAD_DIM) + tl.arange(0, HEAD_DIM)[None, :]
        tl.store(ptrs, out.to(o_dst.dtype.element_ty), mask=rows[:, None] < M)


@triton.jit
def _attention_step(
    q, k, v, acc, l_i, m_i, start, N, qk_scale, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, MASK: tl.constexpr
):
    """One K/V tile of the online softmax (exp2; log2(e) is folded into qk_scale)."""
    if IEEE:
        s = tl.dot(q, k.T, input_precision="ieee")
    else:
        s = tl.dot(q, k.T)
    s = s * qk_scale
    if MASK:
        s = tl.where((start + tl.arange(0, BLOCK_N))[None, :] < N, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attention_fwd_kernel(
    q_src,  # TMA: host tensor descriptor over q [B, H, M, D], block [1, 1, BLOCK_M, D]; else q's pointer
    k_src,  # [B, H, N, D], block [1, 1, BLOCK_N, D]
    v_src,  # [B, H, N, D], block [1, 1, BLOCK_N, D]
    o_dst,  # [B, M, H*D] (the [B, M, H, D] output), block [1, BLOCK_M, D]
    stride_qb, stride_qh, stride_qm,  # element strides of q, k, v (the pointer path; TMA's are in the descriptors)
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H,
    M,
    N,
    num_tiles,  # B * H * cdiv(M, BLOCK_M)
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    TMA: tl.constexpr,
    PERSISTENT: tl.constexpr,  # grid = #SMs, each program walks tiles pid, pid + grid, ...
):  # fmt: skip
    num_m = tl.cdiv(M, BLOCK_M)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _attention_tile(
                q_src, k_src, v_src, o_dst, tile,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                H, M, N, num_m, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, IEEE, TMA,
            )  # fmt: skip
    else:
        _attention_tile(
            q_src, k_src, v_src, o_dst, tl.program_id(0),
            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            H, M, N, num_m, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, IEEE, TMA,
        )  # fmt: skip


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
    """TMA descriptors need 16-byte aligned base addresses and strides and a contiguous last dim."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in t.stride()[:-1])


_SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 120: 170}  # for planning without a GPU


def persistent_ok(arch: int) -> bool:
    """The persistent variant compiles cleanly on sm_90 (189 registers at D=128). It spills on
    sm_100 (308 B) and sm_120 (272 B), and the pointer path of sm_80 / 89 has no registers to spare."""
    return arch // 10 == 9


def num_sms(device: torch.device, arch: int | None) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT.get(arch, 132)


def plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    arch: int | None = None,
    persistent: bool = False,
    tma: bool | None = None,
) -> Launch:
    """q [B, H, M, D], k / v [B, H, N, D]: any strides with a contiguous last dim and 16-byte aligned
    others (read through 4-D host descriptors). The output is written as [B, M, H, D] and returned
    as its [B, H, M, D] view. ``persistent``: one program per SM walking the tiles. ``tma``: tensor
    descriptors (sm_90 and later; the default there) or pointer loads (sm_80 / 89)."""
    b, h, m, d = q.shape
    n = k.shape[2]
    if arch is None and q.device.type == "cuda":
        arch = device_arch(q.device)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((b, m, h, d), dtype=q.dtype, device=q.device)
    block_m, block_n, warps, stages = config_for(q.device, d, arch)
    sm_scale = scale if scale is not None else d**-0.5
    if persistent and arch is not None and not persistent_ok(arch):
        raise ValueError(f"the persistent attention kernel is not shipped for sm_{arch}")
    if tma is None:
        # sm_90 / sm_100; sm_120's D=128 tile spills 136 B through descriptors and none by pointers;
        # the interpreter runs the descriptor path unless asked
        tma = arch is None or 90 <= arch < 120
    if tma:
        srcs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, bl, d]) for t, bl in
                ((q, block_m), (k, block_n), (v, block_n))]  # fmt: skip
        dst = TensorDescriptor(out, [b, m, h * d], [m * h * d, h * d, 1], [1, block_m, d])
    else:
        srcs, dst = [q, k, v], out
    tiles = b * h * triton.cdiv(m, block_m)
    grid = (min(tiles, num_sms(q.device, arch)),) if persistent else (tiles,)
    return Launch(
        _attention_fwd_kernel,
        grid,
        (*srcs, dst, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], h, m, n, tiles, sm_scale * 1.4426950408889634),
        {"HEAD_DIM": d, "BLOCK_M": block_m, "BLOCK_N": block_n, "IEEE": q.dtype == torch.float32,
         "TMA": tma, "PERSISTENT": persistent, "num_warps": warps, "num_stages": stages},
        out.transpose(1, 2),
        reads=(q, k, v),
        writes=(out,),
    )  # fmt: skip


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, persistent: bool = False
) -> torch.Tensor:
    return plan(q, k, v, scale, persistent=persistent)()


# (heads, head dim, tokens) at 1024x1024: FLUX.1 joint attention, SD3.5-large, SD3.5-medium attn2
ATTENTION_SHAPES = {"flux": (24, 128, 4608), "sd3.5-large": (38, 64, 4429), "sd3.5-medium attn2": (24, 64, 4096)}


def shipped(arch: int) -> list[tuple[str, Launch]]:
    out = []
    for name, (heads, d, tokens) in ATTENTION_SHAPES.items():
        for dt in (torch.bfloat16, torch.float16):
            # q, k, v as the joint qk_norm(_rope) ops write them: contiguous [B, H, L, D]
            q = meta(1, heads, tokens, d, dtype=dt)
            for persistent in (False, True) if persistent_ok(arch) else (False,):
                launch = plan(q, q, q, None, arch, persistent=persistent)
                bm, bn, w, s = (launch.meta[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
                variant = " persistent" if persistent else ""
                out.append((f"attention {name} D={d} {bm}x{bn} w{w} s{s}{variant} {short(dt)}", launch))
    return out
