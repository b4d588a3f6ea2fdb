"""SiLU(GroupNorm(x)): one program per (sample, group), NCHW or channels-last through strides.

Three passes over the group (mean, variance of the centred values, normalise + affine + SiLU) in
BLOCK_HW x BLOCK_CG tiles, so any spatial size fits and the variance is computed stably. Spatial
offsets are 64-bit: channels-last rows of 256 channels pass 2^31 elements from about 2900^2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, Launch, meta, short


@triton.jit
def _groupnorm_silu_fwd_kernel(
    x_ptr,  # [B, C, HW] viewed through strides (NCHW: stride_c = HW, stride_hw = 1; NHWC: 1, C)
    w_ptr,  # [C]
    b_ptr,  # [C]
    out_ptr,  # same strides as x
    stride_xb,
    stride_c,
    stride_hw,
    C,
    HW,
    num_groups,
    eps,
    CG: tl.constexpr,  # channels per group
    BLOCK_CG: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // num_groups
    g = pid % num_groups
    ch = tl.arange(0, BLOCK_CG)
    ch_mask = ch < CG
    base = n * stride_xb + (g * CG) * stride_c
    count = CG * HW
    acc = tl.zeros((BLOCK_CG, BLOCK_HW), dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        m = ch_mask[:, None] & (hw < HW)[None, :]
        offs = base + ch[:, None] * stride_c + hw[None, :].to(tl.int64) * stride_hw
        acc += tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count
    acc = tl.zeros((BLOCK_CG, BLOCK_HW), dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        m = ch_mask[:, None] & (hw < HW)[None, :]
        offs = base + ch[:, None] * stride_c + hw[None, :].to(tl.int64) * stride_hw
        d = tl.where(m, tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / count + eps)
    w = tl.load(w_ptr + g * CG + ch, mask=ch_mask, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + g * CG + ch, mask=ch_mask, other=0.0).to(tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        m = ch_mask[:, None] & (hw < HW)[None, :]
        offs = base + ch[:, None] * stride_c + hw[None, :].to(tl.int64) * stride_hw
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w[:, None] + bias[:, None]
        tl.store(out_ptr + offs, (y * tl.sigmoid(y)).to(out_ptr.dtype.element_ty), mask=m)


def plan(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float) -> Launch:
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
    weight, bias = weight.contiguous(), bias.contiguous()
    return Launch(
        _groupnorm_silu_fwd_kernel,
        (b * num_groups,),
        (x3, weight, bias, out, x3.stride(0), x3.stride(1), x3.stride(2), c, hw, num_groups, eps),
        {"CG": cg, "BLOCK_CG": block_cg, "BLOCK_HW": block_hw, "num_warps": 4},
        out,
        reads=(x, x, x, weight, bias),  # three passes over each group: mean, centred variance, output
        writes=(out,),
    )


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
                out.append((f"groupnorm_silu {name} {layout} {short(dt)}", plan(x, w, w, 32, 1e-6)))
    return out
