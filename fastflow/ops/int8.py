"""int8 (W8A8) ops: per-token activation quantization, the scaled int8 GEMM, the linear layer built
from them, and the two fused entry points that quantize where the LayerNorm writes (so a block's
activations are quantized once, as FP8's are):

* ``int8_quantize(x)``: x [M, K] float -> (q int8 [M, K], scale fp32 [M]).
* ``int8_scaled_mm(xq, x_scale, w, w_scale, bias, gelu, out_dtype)``: [M, K] x [N, K]^T -> [M, N],
  int32 accumulation, then scales, bias and GELU (tanh) in fp32.
* ``int8_linear(x, w, w_scale, bias, gelu)``: the two above in one op.
* ``layernorm_modulate_int8(x, shift, scale, eps)``: [B, L, C] -> (q [B*L, C], scale [B*L]).
* ``gated_residual_layernorm_modulate_int8(x, gate, y, shift, scale, eps)``: r = x + gate * y and
  the modulated LayerNorm of r quantized: (r [B, L, C], q, scale).

The bodies (:mod:`.reference_int8`) are the implementation on every device: the GEMM is
``torch._int_mm`` on CPU and on CUDA sm_80+, refused elsewhere (:mod:`.int8_gemm`). Inputs are
checked on every backend (typed :class:`~fastflow.errors.InputError`).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ._registry import defop
from .reference_int8 import (
    gated_residual_layernorm_modulate_int8_ref,
    int8_linear_ref,
    int8_quantize_ref,
    int8_scaled_mm_ref,
    layernorm_modulate_int8_ref,
)

INT8 = torch.int8


def _check_float(name: str, x: torch.Tensor, dims: int | None) -> None:
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or (dims and x.dim() != dims):
        shape = f"{dims}-D " if dims else ""
        raise InputError(f"{name} takes a {shape}float tensor (fp32 / bf16 / fp16), got {x.dtype} {tuple(x.shape)}")


def _check_scale(name: str, scale: torch.Tensor, size: int) -> None:
    if scale.dtype != torch.float32 or tuple(scale.shape) != (size,):
        raise InputError(f"{name} must be fp32 of shape ({size},), got {scale.dtype} {tuple(scale.shape)}")


def _check_weight(w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, k: int) -> None:
    if w.dtype != INT8 or w.dim() != 2:
        raise InputError(f"int8 weights must be 2-D torch.int8, got {w.dtype} {tuple(w.shape)}")
    if w.shape[1] != k:
        raise InputError(f"int8 linear: input has {k} features, weight expects {w.shape[1]}")
    _check_scale("w_scale (one per output channel)", w_scale, w.shape[0])
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise InputError(f"bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")


def _check_quantize(x):
    _check_float("int8_quantize", x, 2)


def _check_scaled_mm(xq, x_scale, w, w_scale, bias, gelu, out_dtype):
    if xq.dtype != INT8 or xq.dim() != 2:
        raise InputError(f"int8_scaled_mm takes 2-D torch.int8 activations, got {xq.dtype} {tuple(xq.shape)}")
    _check_scale("x_scale (one per row)", x_scale, xq.shape[0])
    _check_weight(w, w_scale, bias, xq.shape[1])
    if not out_dtype.is_floating_point:
        raise InputError(f"int8_scaled_mm writes a float dtype, not {out_dtype}")


def _check_linear(x, w, w_scale, bias, gelu):
    _check_float("int8_linear", x, None)
    _check_weight(w, w_scale, bias, x.shape[-1])


def _check_ln(x, shift, scale, eps):
    _check_float("layernorm_modulate_int8", x, 3)


def _check_gated(x, gate, y, shift, scale, eps):
    _check_float("gated_residual_layernorm_modulate_int8", x, 3)


def _fake_quantize(x):
    return torch.empty(x.shape, dtype=INT8, device=x.device), x.new_empty((x.shape[0],), dtype=torch.float32)


def _fake_scaled_mm(xq, x_scale, w, w_scale, bias, gelu, out_dtype):
    return torch.empty((xq.shape[0], w.shape[0]), dtype=out_dtype, device=xq.device)


def _fake_linear(x, w, w_scale, bias, gelu):
    return torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device)


def _fake_ln(x, shift, scale, eps):
    rows = x.shape[0] * x.shape[1]
    return torch.empty((rows, x.shape[2]), dtype=INT8, device=x.device), x.new_empty((rows,), dtype=torch.float32)


def _fake_gated(x, gate, y, shift, scale, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), *_fake_ln(x, shift, scale, eps))


int8_quantize = defop("int8_quantize", int8_quantize_ref, _fake_quantize, check=_check_quantize)
int8_scaled_mm = defop("int8_scaled_mm", int8_scaled_mm_ref, _fake_scaled_mm, check=_check_scaled_mm)
int8_linear = defop("int8_linear", int8_linear_ref, _fake_linear, check=_check_linear)
layernorm_modulate_int8 = defop("layernorm_modulate_int8", layernorm_modulate_int8_ref, _fake_ln, check=_check_ln)
gated_residual_layernorm_modulate_int8 = defop(
    "gated_residual_layernorm_modulate_int8",
    gated_residual_layernorm_modulate_int8_ref,
    _fake_gated,
    check=_check_gated,
)
