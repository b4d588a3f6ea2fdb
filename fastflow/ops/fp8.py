"""FP8 (W8A8 e4m3) ops: activation quantization, the scaled GEMM, the linear layer built from them,
and modulated LayerNorm fused with per-token quantization (its output feeds qkv / linear1 directly).

* ``fp8_quantize(x, static_scale, per_token)``: x [M, K] -> (q e4m3 [M, K], scale fp32 [M] or [1]).
* ``fp8_scaled_mm(xq, x_scale, w, w_scale, bias, gelu, out_dtype)``: [M, K] x [N, K]^T -> [M, N],
  scales, bias and GELU (tanh) applied to the fp32 accumulator.
* ``fp8_linear(x, w, w_scale, bias, static_scale, per_token, gelu)``: the two above in one op.
* ``layernorm_modulate_fp8(x, shift, scale, eps)``: [B, L, C] -> (q [B*L, C], scale [B*L]).
* ``gated_residual_layernorm_modulate_fp8(x, gate, y, shift, scale, eps)``: the sub-block boundary
  r = x + gate * y with the modulated LayerNorm of r quantized: (r [B, L, C], q, scale).

References dequantize and multiply in fp32 (:mod:`.reference`); the Triton kernels run on GPUs with
FP8 tensor cores (sm_89+), elsewhere the reference runs.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ._registry import defop
from .reference import (
    FP8_DTYPE,
    fp8_linear_ref,
    fp8_quantize_ref,
    fp8_scaled_mm_ref,
    gated_residual_layernorm_modulate_fp8_ref,
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
fp8_scaled_mm = defop(
    "fp8_scaled_mm",
    fp8_scaled_mm_ref,
    _fake_scaled_mm,
    impls={"triton": f"{_GEMM}:fp8_scaled_mm_fwd"},
    check=_check_scaled_mm,
)
fp8_linear = defop(
    "fp8_linear", fp8_linear_ref, _fake_linear, impls={"triton": f"{_GEMM}:fp8_linear_fwd"}, check=_check_linear
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
