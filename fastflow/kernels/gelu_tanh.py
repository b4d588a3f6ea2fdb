"""GELU (tanh approximation), elementwise, fp32 math, optionally after a bias add (the MLP's bias-free
up-projection). tanh(u) = 2 sigmoid(2u) - 1 avoids libdevice."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, Launch, meta, short

BLOCK = 1024


@triton.jit
def gelu_tanh_f32(x):
    """GELU (tanh approximation) of fp32 x: 0.5 x (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3),
    with tanh u = 2 sigmoid(2u) - 1 (no libdevice)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (2.0 * tl.sigmoid(2.0 * u))


@triton.jit
def _gelu_tanh_fwd_kernel(
    x_ptr,  # [N], contiguous
    bias_ptr,  # [WIDTH] (read only when HAS_BIAS)
    out_ptr,  # [N], contiguous
    N,
    WIDTH,  # bias length: x is [N / WIDTH, WIDTH]
    BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + offs % WIDTH, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, gelu_tanh_f32(x).to(out_ptr.dtype.element_ty), mask=mask)


def plan(x: torch.Tensor, bias: torch.Tensor | None) -> Launch:
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    bias = None if bias is None else bias.contiguous()
    return Launch(
        _gelu_tanh_fwd_kernel,
        (triton.cdiv(n, BLOCK),),
        (x, x if bias is None else bias, out, n, x.shape[-1] if x.ndim else 1),
        {"BLOCK": BLOCK, "HAS_BIAS": bias is not None, "num_warps": 4},
        out,
        reads=(x,) if bias is None else (x, bias),
        writes=(out,),
    )


def gelu_tanh_fwd(x: torch.Tensor) -> torch.Tensor:
    return plan(x, None)()


def bias_gelu_tanh_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return plan(x, bias)()


# FLUX.1 / SD3.5-large MLP activations at 1024x1024: tokens x mlp_hidden
MLP_SHAPES = {"flux mlp": (4096, 12288), "flux single mlp": (4608, 12288), "sd3.5-large mlp": (4429, 9728)}


def shipped(arch: int) -> list[tuple[str, Launch]]:
    out = []
    for name, (rows, width) in MLP_SHAPES.items():
        for dt in DTYPES:
            x = meta(1, rows, width, dtype=dt)
            out.append((f"gelu_tanh {name} {short(dt)}", plan(x, None)))
            out.append((f"bias_gelu_tanh {name} {short(dt)}", plan(x, meta(width, dtype=dt))))
    return out
