"""SiLU(GroupNorm(x)) in two kernels that spread each group over many programs:

1. statistics: grid (B * G, S); program (bg, s) reduces its slice of the group's spatial extent
   (all CG channels x ``chunk`` positions) to (mean, M2) in fp32, tile by tile with Chan's
   parallel combination (numerically stable, no E[x^2] - E[x]^2);
2. apply: grid (B * G, S) again; each program combines the group's S partials the same way, then
   normalises its slice, applies the affine and SiLU, and writes it.

Two reads and one write of x, and B * G * S programs (S up to 64) instead of B * G = 32 serial
ones on a 132-SM GPU. NCHW or channels-last through strides; 64-bit offsets (channels-last rows of
256 channels pass 2^31 elements from about 2900^2). ``chunk`` and S are run-time values, so a new
resolution does not recompile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import DTYPES, Launch, meta, short

MAX_SPLITS = 64  # partials per group (a power of two: the apply kernel loads them as one vector)
TARGET_PROGRAMS = 2048  # enough to fill a 132-SM GPU several times over


@triton.jit
def _tile_offsets(base, ch, hw, stride_c, stride_hw):
    return base + ch[:, None] * stride_c + hw[None, :].to(tl.int64) * stride_hw


@triton.jit
def _groupnorm_stats_kernel(
    x_ptr,  # [B, C, HW] viewed through strides (NCHW: stride_c = HW, stride_hw = 1; NHWC: 1, C)
    partial_ptr,  # [B * G, MAX_SPLITS, 2] fp32 out: (mean, M2) of each slice
    stride_xb,
    stride_c,
    stride_hw,
    HW,
    num_groups,
    chunk,  # spatial positions per slice (a multiple of BLOCK_HW)
    CG: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    bg = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    ch = tl.arange(0, BLOCK_CG)
    ch_mask = ch < CG
    base = (bg // num_groups) * stride_xb + ((bg % num_groups) * CG) * stride_c
    n = 0.0
    mean = 0.0
    m2 = 0.0
    start = s * chunk
    stop = tl.minimum(start + chunk, HW)
    for tile in range(start, stop, BLOCK_HW):
        hw = tile + tl.arange(0, BLOCK_HW)
        m = ch_mask[:, None] & (hw < stop)[None, :]
        x = tl.load(x_ptr + _tile_offsets(base, ch, hw, stride_c, stride_hw), mask=m, other=0.0).to(tl.float32)
        n_t = (CG * tl.minimum(BLOCK_HW, stop - tile)).to(tl.float32)
        mean_t = tl.sum(tl.sum(x, axis=1), axis=0) / n_t
        d = tl.where(m, x - mean_t, 0.0)
        m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
        delta = mean_t - mean
        total = n + n_t
        mean += delta * (n_t / total)
        m2 += m2_t + delta * delta * (n * n_t / total)
        n = total
    out = partial_ptr + (bg * MAX_SPLITS + s) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit
def _groupnorm_silu_apply_kernel(
    x_ptr,  # [B, C, HW] through strides, as above
    partial_ptr,  # [B * G, MAX_SPLITS, 2] fp32
    w_ptr,  # [C]
    b_ptr,  # [C]
    out_ptr,  # same strides as x
    stride_xb,
    stride_c,
    stride_hw,
    HW,
    num_groups,
    chunk,
    splits,  # S: slices per group (<= MAX_SPLITS)
    eps,
    CG: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    bg = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    g = bg % num_groups
    # the group's statistics from its S partials: Chan's combination in closed form
    i = tl.arange(0, MAX_SPLITS)
    valid = i < splits
    n_i = tl.where(valid, CG * (tl.minimum((i + 1) * chunk, HW) - i * chunk), 0).to(tl.float32)
    mean_i = tl.load(partial_ptr + (bg * MAX_SPLITS + i) * 2, mask=valid, other=0.0)
    m2_i = tl.load(partial_ptr + (bg * MAX_SPLITS + i) * 2 + 1, mask=valid, other=0.0)
    count = tl.sum(n_i, axis=0)
    mean = tl.sum(n_i * mean_i, axis=0) / count
    delta = tl.where(valid, mean_i - mean, 0.0)
    var = (tl.sum(m2_i, axis=0) + tl.sum(n_i * delta * delta, axis=0)) / count
    rstd = 1.0 / tl.sqrt(var + eps)

    ch = tl.arange(0, BLOCK_CG)
    ch_mask = ch < CG
    base = (bg // num_groups) * stride_xb + (g * CG) * stride_c
    w = tl.load(w_ptr + g * CG + ch, mask=ch_mask, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + g * CG + ch, mask=ch_mask, other=0.0).to(tl.float32)
    scale = w * rstd  # y = (x - mean) * scale + b; not x * scale + (b - mean * scale), which cancels
    # catastrophically when |mean| >> std
    start = s * chunk
    stop = tl.minimum(start + chunk, HW)
    for tile in range(start, stop, BLOCK_HW):
        hw = tile + tl.arange(0, BLOCK_HW)
        m = ch_mask[:, None] & (hw < stop)[None, :]
        offs = _tile_offsets(base, ch, hw, stride_c, stride_hw)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = (x - mean) * scale[:, None] + bias[:, None]
        tl.store(out_ptr + offs, (y * tl.sigmoid(y)).to(out_ptr.dtype.element_ty), mask=m)


@dataclass
class Plan:
    """The two launches; calling runs both and returns the output."""

    stats: Launch
    apply: Launch

    def __call__(self):
        self.stats()
        return self.apply()

    @property
    def bytes_moved(self) -> int:
        return self.stats.bytes_moved + self.apply.bytes_moved


def plan(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float) -> Plan:
    b, c = x.shape[:2]
    hw = x[0, 0].numel()
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if not channels_last:
        x = x.contiguous()
    out = torch.empty_like(x)  # preserves the memory format
    x3 = x.view(b, c, hw) if not channels_last else x.permute(0, 2, 3, 1).reshape(b, hw, c).transpose(1, 2)
    cg = c // num_groups
    block_cg = triton.next_power_of_2(cg)
    block_hw = max(16, min(triton.next_power_of_2(hw), max(16, 2048 // block_cg)))
    groups = b * num_groups
    splits = max(1, min(MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, groups), triton.cdiv(hw, block_hw)))
    chunk = triton.cdiv(triton.cdiv(hw, splits), block_hw) * block_hw
    splits = triton.cdiv(hw, chunk)
    partial = torch.empty((groups, MAX_SPLITS, 2), dtype=torch.float32, device=x.device)
    weight, bias = weight.contiguous(), bias.contiguous()
    strides = (x3.stride(0), x3.stride(1), x3.stride(2))
    constants = {"CG": cg, "BLOCK_CG": block_cg, "BLOCK_HW": block_hw, "MAX_SPLITS": MAX_SPLITS, "num_warps": 4}
    used = partial[:, :splits]  # what the kernels really touch, for the byte count
    stats = Launch(
        _groupnorm_stats_kernel,
        (groups, splits),
        (x3, partial, *strides, hw, num_groups, chunk),
        constants,
        partial,
        reads=(x,),
        writes=(used,),
    )
    apply = Launch(
        _groupnorm_silu_apply_kernel,
        (groups, splits),
        (x3, partial, weight, bias, out, *strides, hw, num_groups, chunk, splits, eps),
        constants,
        out,
        reads=(x, weight, bias, used),
        writes=(out,),
    )
    return Plan(stats, apply)


def groupnorm_silu_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float
) -> torch.Tensor:
    return plan(x, weight, bias, num_groups, eps)()


# VAE decoder GroupNorm inputs for a 1024x1024 image: channels x spatial side
VAE_SHAPES = {
    "vae mid 512x128": (512, 128),
    "vae up 512x256": (512, 256),
    "vae up 256x512": (256, 512),
    "vae up 128x1024": (128, 1024),
}


def shipped(arch: int) -> list[tuple[str, Launch]]:
    out = []
    for name, (c, side) in VAE_SHAPES.items():
        for dt in DTYPES:
            w = meta(c, dtype=dt)
            for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
                x = meta(1, c, side, side, dtype=dt).contiguous(memory_format=fmt)
                p = plan(x, w, w, 32, 1e-6)
                out.append((f"groupnorm_silu stats {name} {layout} {short(dt)}", p.stats))
                out.append((f"groupnorm_silu apply {name} {layout} {short(dt)}", p.apply))
    return out
