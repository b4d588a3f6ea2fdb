"""FP8 (W8A8 e4m3) ops: activation quantization, the scaled GEMM, the linear layer built from them,
and modulated LayerNorm fused with per-token quantization (its output feeds qkv / linear1 directly).

* ``fp8_quantize(x, static_scale, per_token)``: x [M, K] -> (q e4m3 [M, K], scale fp32 [M] or [1]).
* ``fp8_scaled_mm(xq, x_scale, w, w_scale, bias, gelu, out_dtype)``: [M, K] x [N, K]^T -> [M, N],
  scales, bias and GELU (tanh) applied to the fp32 accumulator.
* ``fp8_linear(x, w, w_scale, bias, static_scale, per_token, gelu)``: the two above in one op.
* ``layernorm_modulate_fp8(x, shift, scale, eps)``: [B, L, C] -> (q [B*L, C], scale [B*L]).
* ``gated_residual_layernorm_modulate_fp8(x, gate, y, shift, scale, eps)``: the sub-block boundary
  r = x + gate * y with the modulated LayerNorm of r quantized: (r [B, L, C], q, scale).

References dequantize and multiply in fp32 (:mod:`.reference`); the kernels run on GPUs with FP8
tensor cores (sm_89+), elsewhere the reference runs. On CUDA, a GEMM without a fused epilogue (no
GELU: qkv, proj, mlp.2, linear2, modulation) goes to cuBLASLt / CUTLASS through ``torch._scaled_mm``
with row-wise scales (per-token activation x per-channel weight, fp32 accumulation, bf16 out) on
sm_89 / sm_90 / sm_100 (:func:`scaled_mm_rowwise`): persistent, warp-specialized kernels with good
wave counts where fastflow's Triton GEMM runs one tile per program. The Triton GEMM keeps the GELU
epilogue (mlp.0) and everything ``_scaled_mm`` cannot take (fp16 / fp32 out, N or K not a multiple
of 16, other GPUs).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ._registry import OPS, defop
from .capability import capability
from .reference import (
    FP8_DTYPE,
    fp8_linear_ref,
    fp8_quantize_ref,
    fp8_scaled_mm_ref,
    gated_residual_layernorm_modulate_fp8_ref,
    gelu_tanh_ref,
    layernorm_modulate_fp8_ref,
)

_QUANT = "fastflow.kernels.fp8_quantize"
_GEMM = "fastflow.kernels.fp8_gemm"


def _check_scale(name: str, scale: torch.Tensor | None, sizes: tuple[int, ...]) -> None:
    if scale is None:
        return
    if scale.dtype != torch.float32 or scale.dim() > 1 or scale.numel() not in sizes:
        raise InputError(
            f"{name} must be fp32 with one of {sorted(set(sizes))} elements, got {scale.dtype} {tuple(scale.shape)}"
        )


def _check_weight(w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, k: int) -> None:
    if w.dtype != FP8_DTYPE or w.dim() != 2:
        raise InputError(f"FP8 weights must be 2-D {FP8_DTYPE}, got {w.dtype} {tuple(w.shape)}")
    if w.shape[1] != k:
        raise InputError(f"FP8 linear: input has {k} features, weight expects {w.shape[1]}")
    _check_scale("w_scale", w_scale, (1, w.shape[0]))
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise InputError(f"bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")


def _check_quantize(x, static_scale, per_token):
    if x.dim() != 2 or not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise InputError(f"fp8_quantize takes a 2-D float tensor, got {x.dtype} {tuple(x.shape)}")
    _check_scale("static_scale", static_scale, (1,))


def _check_scaled_mm(xq, x_scale, w, w_scale, bias, gelu, out_dtype):
    if xq.dtype != FP8_DTYPE or xq.dim() != 2:
        raise InputError(f"fp8_scaled_mm takes 2-D {FP8_DTYPE} activations, got {xq.dtype} {tuple(xq.shape)}")
    _check_scale("x_scale", x_scale, (1, xq.shape[0]))
    _check_weight(w, w_scale, bias, xq.shape[1])


def _check_linear(x, w, w_scale, bias, static_scale, per_token, gelu):
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise InputError(f"fp8_linear takes float activations, got {x.dtype}")
    _check_weight(w, w_scale, bias, x.shape[-1])
    _check_scale("static_scale", static_scale, (1,))


def _fake_quantize(x, static_scale, per_token):
    rows = x.shape[0] if per_token and static_scale is None else 1
    return torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device), x.new_empty((rows,), dtype=torch.float32)


def _fake_scaled_mm(xq, x_scale, w, w_scale, bias, gelu, out_dtype):
    return torch.empty((xq.shape[0], w.shape[0]), dtype=out_dtype, device=xq.device)


def _fake_linear(x, w, w_scale, bias, static_scale, per_token, gelu):
    return torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device)


def _fake_ln_fp8(x, shift, scale, eps):
    rows = x.shape[0] * x.shape[1]
    return (
        torch.empty((rows, x.shape[2]), dtype=FP8_DTYPE, device=x.device),
        x.new_empty((rows,), dtype=torch.float32),
    )


fp8_quantize = defop(
    "fp8_quantize",
    fp8_quantize_ref,
    _fake_quantize,
    impls={"triton": f"{_QUANT}:fp8_quantize_fwd", "cuda_cpp": "fastflow.ops.cuda_cpp:fp8_quantize"},
    check=_check_quantize,
)
# compute capabilities whose torch._scaled_mm has row-wise (per-token x per-channel) FP8 kernels
SCALED_MM_CAPABILITIES = ((8, 9), (9, 0), (10, 0))


def scaled_mm_rowwise(xq_or_x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, gelu: bool) -> bool:
    """Whether a GEMM goes through ``torch._scaled_mm`` with row-wise scales: no fused epilogue, a GPU
    in :data:`SCALED_MM_CAPABILITIES`, bf16 out (the row-wise kernels' only output type), K and N
    multiples of 16 and a row-major weight (cuBLASLt / CUTLASS alignment)."""
    if gelu or out_dtype != torch.bfloat16 or capability(xq_or_x.device) not in SCALED_MM_CAPABILITIES:
        return False
    n, k = w.shape
    return k % 16 == 0 and n % 16 == 0 and w.stride(1) == 1 and w.stride(0) == k


def _rowwise(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A [rows] or [1] fp32 scale as _scaled_mm's row-wise operand: [rows, 1] (cols 1) or [1, cols]."""
    return scale.float().reshape(rows, cols) if scale.numel() > 1 else scale.float().reshape(1, 1).expand(rows, cols)


def scaled_mm_rowwise_gemm(xq, x_scale, w, w_scale, bias, out_dtype) -> torch.Tensor:
    """(xq * x_scale) @ (w * w_scale)^T + bias by ``torch._scaled_mm``: row-wise scales (a per-tensor
    scale is broadcast to rows), fp32 accumulation with promotion (``use_fast_accum=False``: the
    fast mode keeps Hopper's limited-precision FP8 accumulator, see docs/kernels.md)."""
    m, n = xq.shape[0], w.shape[0]
    return torch._scaled_mm(
        xq,
        w.t(),  # [K, N] column-major, as the FP8 GEMMs want their second operand
        scale_a=_rowwise(x_scale, m, 1).contiguous(),
        scale_b=_rowwise(w_scale, 1, n).contiguous(),
        bias=bias,
        out_dtype=out_dtype,
        use_fast_accum=False,
    )


def _gemm_module():
    import importlib

    return importlib.import_module(_GEMM)


def _scaled_mm_kernels(xq, x_scale, w, w_scale, bias, gelu, out_dtype):
    """The CUDA implementation of fp8_scaled_mm: _scaled_mm for plain layers, else the Triton GEMM."""
    if scaled_mm_rowwise(xq, w, out_dtype, gelu) and xq.stride(1) == 1 and xq.stride(0) % 16 == 0:
        return scaled_mm_rowwise_gemm(xq, x_scale, w, w_scale, bias, out_dtype)
    return _gemm_module().fp8_scaled_mm_fwd(xq, x_scale, w, w_scale, bias, gelu, out_dtype)


def _linear_kernels(x, w, w_scale, bias, static_scale, per_token, gelu):
    """The CUDA implementation of fp8_linear: the Triton quantizer then _scaled_mm for plain layers,
    else the Triton quantizer and GEMM (with its GELU epilogue)."""
    if not scaled_mm_rowwise(x, w, x.dtype, gelu):
        return _gemm_module().fp8_linear_fwd(x, w, w_scale, bias, static_scale, per_token, gelu)
    lead, k = x.shape[:-1], x.shape[-1]
    quantized = OPS["fp8_quantize"].run("triton", (x.reshape(-1, k), static_scale, per_token))  # [M, K], [M] or [1]
    y = scaled_mm_rowwise_gemm(*quantized, w, w_scale, bias, x.dtype)  # [M, N]
    return y.reshape(*lead, w.shape[0])


fp8_scaled_mm = defop(
    "fp8_scaled_mm",
    fp8_scaled_mm_ref,
    _fake_scaled_mm,
    impls={"triton": _scaled_mm_kernels},
    check=_check_scaled_mm,
    kernels=(_GEMM,),
)
fp8_linear = defop(
    "fp8_linear",
    fp8_linear_ref,
    _fake_linear,
    impls={"triton": _linear_kernels},
    check=_check_linear,
    kernels=(_GEMM, _QUANT),
)
layernorm_modulate_fp8 = defop(
    "layernorm_modulate_fp8",
    layernorm_modulate_fp8_ref,
    _fake_ln_fp8,
    impls={"triton": f"{_QUANT}:layernorm_modulate_fp8_fwd"},
)


def _fake_gated_fp8(x, gate, y, shift, scale, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), *_fake_ln_fp8(x, shift, scale, eps))


gated_residual_layernorm_modulate_fp8 = defop(
    "gated_residual_layernorm_modulate_fp8",
    gated_residual_layernorm_modulate_fp8_ref,
    _fake_gated_fp8,
    impls={"triton": f"{_QUANT}:gated_residual_layernorm_modulate_fp8_fwd"},
)


def scaled_mm_native(xq, x_scale, w, w_scale, bias, out_dtype):
    """The same product through ``torch._scaled_mm`` (cuBLASLt on CUDA, a native kernel on CPU):
    a second implementation to check the reference against; needs K and N multiples of 16."""
    a_scale = x_scale.reshape(-1, 1) if x_scale.numel() > 1 else x_scale.reshape(())
    b_scale = w_scale.reshape(1, -1) if w_scale.numel() > 1 else w_scale.reshape(())
    if a_scale.dim() != b_scale.dim():  # rowwise scaling wants both scales 2-D
        a_scale = a_scale.reshape(-1, 1).expand(xq.shape[0], 1).contiguous()
        b_scale = b_scale.reshape(1, -1).expand(1, w.shape[0]).contiguous()
    return torch._scaled_mm(xq, w.t(), scale_a=a_scale, scale_b=b_scale, bias=bias, out_dtype=out_dtype)


def gelu_tanh_fp8_quantize_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU (tanh) of x [M, K] in x's dtype, then per-token quantization: (q [M, K] e4m3, scale fp32
    [M]); what mlp.2 / linear2 read from the MLP activation."""
    return fp8_quantize_ref(gelu_tanh_ref(x), None, True)


def _check_gelu_quantize(x):
    if x.dim() != 2 or not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise InputError(f"gelu_tanh_fp8_quantize takes a 2-D float tensor, got {x.dtype} {tuple(x.shape)}")


gelu_tanh_fp8_quantize = defop(
    "gelu_tanh_fp8_quantize",
    gelu_tanh_fp8_quantize_ref,
    lambda x: _fake_quantize(x, None, True),
    impls={"triton": "fastflow.kernels.gelu_fp8_quantize:gelu_tanh_fp8_quantize_fwd"},
    check=_check_gelu_quantize,
)
