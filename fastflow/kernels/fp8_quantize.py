"""FP8 e4m3 activation quantization, one program per row: per-token amax scaling (scale = amax / 448,
q = clamp(x * 448 / amax, +-448) rounded to nearest even) or a given scale (static, or a per-tensor
amax the launcher reduces first); and the same quantization fused after modulated LayerNorm, so the
normalized rows go straight to FP8 without a round trip through memory.

The fused kernel rounds the LayerNorm output to the model dtype before quantizing, as the unfused
path stores it, so fused and unfused give the same bits. Divisions are IEEE (div_rn), as in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, Launch, device_arch, meta, per_sample, row_block, row_warps, short
from .gated_residual_layernorm_modulate import gated_residual_row
from .layernorm_modulate import modulated_layernorm

FP8_MAX = 448.0
MIN_AMAX = 1e-12
_FP8_MAX = tl.constexpr(FP8_MAX)  # jit code reads globals only as constexpr
_MIN_AMAX = tl.constexpr(MIN_AMAX)


@triton.jit
def _quantize_row(x, mask, q_row_ptr, scale_ptr, row, STATIC: tl.constexpr):
    """x fp32 [BLOCK]; stores the e4m3 row, and its scale unless STATIC (then scale_ptr holds it).
    NaN and Inf propagate as in the reference: a row holding NaN gets a NaN scale and NaN codes; an
    Inf gives amax = Inf, scale = Inf, codes 0 (finite x * 0) and NaN (Inf * 0). Triton's max /
    minimum / maximum drop NaN (maxnum), so the NaN is counted apart and the clamp skips NaN."""
    if STATIC:
        inv = tl.math.div_rn(1.0, tl.load(scale_ptr))
    else:
        amax = tl.maximum(tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0), _MIN_AMAX)
        nans = tl.sum(tl.where(mask & (x != x), 1, 0), axis=0)
        amax = tl.where(nans > 0, float("nan"), amax)
        inv = tl.math.div_rn(_FP8_MAX, amax)
        tl.store(scale_ptr + row, tl.math.div_rn(amax, _FP8_MAX))
    v = x * inv
    q = tl.where(v != v, v, tl.minimum(tl.maximum(v, -_FP8_MAX), _FP8_MAX))
    tl.store(q_row_ptr, q.to(tl.float8e4nv), mask=mask)


@triton.jit
def _fp8_quantize_fwd_kernel(
    x_ptr,  # [M, K], last dim contiguous
    q_ptr,  # [M, K] e4m3, contiguous
    scale_ptr,  # [M] fp32 out (per token) or [1] fp32 in (STATIC)
    stride_xm,
    K,
    STATIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    _quantize_row(x, mask, q_ptr + row * K + cols, scale_ptr, row, STATIC)


@triton.jit
def _layernorm_modulate_fp8_fwd_kernel(
    x_ptr,  # [B, L, C], last dim contiguous
    shift_ptr,  # [B, C], contiguous
    scale_ptr,  # [B, C], contiguous
    q_ptr,  # [B * L, C] e4m3, contiguous
    q_scale_ptr,  # [B * L] fp32
    stride_xb,
    stride_xl,
    L,
    C,
    eps,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    t = row % L
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(x_ptr + b * stride_xb + t * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    y = modulated_layernorm(x, mask, cols, b, shift_ptr, scale_ptr, C, eps)
    y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # as the unfused path stores it
    _quantize_row(y, mask, q_ptr + row * C + cols, q_scale_ptr, row, False)


@triton.jit
def _gated_residual_layernorm_modulate_fp8_fwd_kernel(
    x_ptr,  # [B, L, C], contiguous
    gate_ptr,  # [B, C]
    y_ptr,  # [B, L, C], contiguous
    shift_ptr,  # [B, C]
    scale_ptr,  # [B, C]
    r_ptr,  # [B, L, C] out: the residual stream
    q_ptr,  # [B * L, C] e4m3 out: the modulated LayerNorm of r, quantized per token
    q_scale_ptr,  # [B * L] fp32 out
    L,
    C,
    eps,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    r = gated_residual_row(x_ptr, gate_ptr, y_ptr, r_ptr, row, b, cols, mask, C)
    h = modulated_layernorm(r, mask, cols, b, shift_ptr, scale_ptr, C, eps)
    h = h.to(r_ptr.dtype.element_ty).to(tl.float32)  # as the unfused path stores it
    _quantize_row(h, mask, q_ptr + row * C + cols, q_scale_ptr, row, False)


def plan_quantize(x: torch.Tensor, static_scale: torch.Tensor | None, per_token: bool) -> Launch:
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    if static_scale is not None:
        scale = static_scale.float().reshape(1).clone()  # an output never aliases an input
    elif per_token:
        scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    else:  # per tensor: the amax needs every row first; one reduction, then the static kernel
        amax = x.abs().amax().float().clamp(min=MIN_AMAX).reshape(1)
        scale = torch.div(amax, torch.full_like(amax, FP8_MAX))  # IEEE, as the reference's fp8_scales
    block = row_block(k)
    return Launch(
        _fp8_quantize_fwd_kernel,
        (m,),
        (x, q, scale, x.stride(0), k),
        {"STATIC": static_scale is not None or not per_token, "BLOCK_K": block, "num_warps": row_warps(block)},
        (q, scale),
        reads=(x,),
        writes=(q, scale),
    )


def plan_layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> Launch:
    b, seq, c = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    shift, scale = per_sample(shift, b, c, "shift"), per_sample(scale, b, c, "scale")
    q = torch.empty((b * seq, c), dtype=torch.float8_e4m3fn, device=x.device)
    q_scale = torch.empty((b * seq,), dtype=torch.float32, device=x.device)
    block = row_block(c)
    return Launch(
        _layernorm_modulate_fp8_fwd_kernel,
        (b * seq,),
        (x, shift, scale, q, q_scale, x.stride(0), x.stride(1), seq, c, eps),
        {"BLOCK_C": block, "num_warps": row_warps(block)},
        (q, q_scale),
        reads=(x, shift, scale),
        writes=(q, q_scale),
    )


def plan_gated(x, gate, y, shift, scale, eps: float) -> Launch:
    b, seq, c = x.shape
    x, y = x.contiguous(), y.contiguous()
    gate, shift, scale = (per_sample(v, b, c, n) for v, n in ((gate, "gate"), (shift, "shift"), (scale, "scale")))
    r = torch.empty_like(x)
    q = torch.empty((b * seq, c), dtype=torch.float8_e4m3fn, device=x.device)
    q_scale = torch.empty((b * seq,), dtype=torch.float32, device=x.device)
    block = row_block(c)
    return Launch(
        _gated_residual_layernorm_modulate_fp8_fwd_kernel,
        (b * seq,),
        (x, gate, y, shift, scale, r, q, q_scale, seq, c, eps),
        {"BLOCK_C": block, "num_warps": row_warps(block)},
        (r, q, q_scale),
        reads=(x, gate, y, shift, scale),
        writes=(r, q, q_scale),
    )


def native(x: torch.Tensor) -> bool:
    """Triton converts to e4m3 only from sm_89 on; older GPUs run the references (the loader
    dequantizes FP8 weights for them, so this serves models quantized by hand). The launchers
    return NotImplemented there: the op runs its reference (fastflow.ops._registry)."""
    return x.device.type != "cuda" or device_arch(x.device) >= 89


def gated_residual_layernorm_modulate_fp8_fwd(x, gate, y, shift, scale, eps: float):
    if not native(x):
        return NotImplemented
    return plan_gated(x, gate, y, shift, scale, eps)()


def fp8_quantize_fwd(x: torch.Tensor, static_scale: torch.Tensor | None, per_token: bool):
    if not native(x):
        return NotImplemented
    return plan_quantize(x, static_scale, per_token)()


def layernorm_modulate_fp8_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    if not native(x):
        return NotImplemented
    return plan_layernorm_modulate(x, shift, scale, eps)()


# Rows x widths of the activations FP8 layers quantize in FLUX.1 at 1024x1024 (4096 image + 512
# text tokens): the inputs of qkv / linear1 / mlp.0 (3072), mlp.2 (12288) and linear2 (15360).
QUANT_SHAPES = {"flux 3072": (4608, 3072), "flux mlp.2": (4096, 12288), "flux linear2": (4608, 15360)}


def shipped(arch: int) -> list[tuple[str, Launch]]:
    if arch < 89:  # FP8 layers are dequantized at load below sm_89
        return []
    out = []
    for dt in DTYPES:
        for name, (rows, k) in QUANT_SHAPES.items():
            out.append(
                (f"fp8_quantize {name} per-token {short(dt)}", plan_quantize(meta(rows, k, dtype=dt), None, True))
            )
        static = plan_quantize(meta(4608, 3072, dtype=dt), meta(1, dtype=torch.float32), True)
        out.append((f"fp8_quantize flux 3072 static {short(dt)}", static))
        x, vec = meta(1, 4096, 3072, dtype=dt), meta(1, 3072, dtype=dt)
        out.append(
            (f"gated_residual_layernorm_modulate_fp8 flux img {short(dt)}", plan_gated(x, vec, x, vec, vec, 1e-6))
        )
        out.append(
            (
                f"layernorm_modulate_fp8 flux img {short(dt)}",
                plan_layernorm_modulate(x, meta(1, 3072, dtype=dt), meta(1, 3072, dtype=dt), 1e-6),
            )
        )
    return out
