"""Plain-torch references of the int8 (W8A8) ops: symmetric int8 codes in [-127, 127] with fp32
scales (one per token row for activations, one per output channel for weights), the product
accumulated exactly in int32, the scales, bias and GELU applied to it in fp32, one cast to the
model dtype at the end.

Quantization: scale = amax / 127 (amax of the row, at least 1e-12 so an all-zero row gives zero
codes and a finite scale), q = round_half_even(x * (127 / amax)) clamped to +-127. A row holding
NaN gets a NaN scale and one holding Inf an Inf scale (its codes are then unspecified: int8 has no
NaN); the scale carries the non-finite value into every output of that row, as FP8's NaN codes do.

These references are also the fast path: the product is ``torch._int_mm`` on CPU (oneDNN, VNNI /
AMX) and on CUDA GPUs with int8 tensor cores (:mod:`.int8_gemm`), and the rest is a few fp32
passes that torch.compile fuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .int8_gemm import int8_mm
from .reference import gated_residual_layernorm_modulate_ref, layernorm_modulate_ref

INT8_MAX = 127.0
INT8_MIN_AMAX = 1e-12  # an all-zero row quantizes to zeros with a tiny, finite scale


def int8_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(127 / amax, amax / 127), each an IEEE division of two tensors (``scalar / tensor`` would be
    a reciprocal times the scalar, not correctly rounded)."""
    full = torch.full_like(amax, INT8_MAX)
    return torch.div(full, amax), torch.div(amax, full)


def int8_codes(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """round_half_even(x * inv) clamped to +-127, as int8; x any float dtype, inv broadcastable fp32;
    the product in fp32."""
    xf = x.float()  # a mixed bf16 x fp32 product runs torch's slow promoting path (18 ms vs 3 here)
    q = xf.mul_(inv.float()) if xf is not x else xf * inv.float()
    return q.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def int8_quantize_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (q [M, K] int8, scale fp32 [M]) with x ~= q * scale[:, None] (per token)."""
    amax = x.abs().amax(dim=-1).float()  # [M], exact in x's dtype; NaN propagates (6x vector_norm's speed)
    inv, scale = int8_scales(amax.clamp_(min=INT8_MIN_AMAX))
    return int8_codes(x, inv[:, None]), scale


def int8_scaled_mm_ref(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """epilogue((xq @ w^T) * x_scale[:, None] * w_scale[None, :] + bias) in fp32, cast to out_dtype.
    xq [M, K] int8; x_scale fp32 [M]; w [N, K] int8; w_scale fp32 [N]; bias [N] or None; gelu
    applies GELU (tanh) last. Returns [M, N]."""
    return int8_epilogue(int8_mm(xq, w), x_scale, w_scale, bias, gelu, out_dtype)


def int8_epilogue(acc, x_scale, w_scale, bias, gelu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """The int32 accumulator [M, N] -> fp32, times the row and column scales, plus bias, GELU, cast."""
    y = acc.to(torch.float32).mul_(x_scale.reshape(-1, 1)).mul_(w_scale.reshape(1, -1))  # [M, N]
    if bias is not None:
        y = y.add_(bias)
    if gelu:
        y = F.gelu(y, approximate="tanh")
    return y.to(out_dtype)


def int8_linear_ref(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False
) -> torch.Tensor:
    """An int8 linear layer: x [..., K] quantized per token (int8_quantize_ref), then
    int8_scaled_mm_ref with w [N, K] int8. Returns [..., N] in x's dtype."""
    xq, x_scale = int8_quantize_ref(x.reshape(-1, x.shape[-1]))  # [M, K], [M]
    y = int8_scaled_mm_ref(xq, x_scale, w, w_scale, bias, gelu, x.dtype)  # [M, N]
    return y.reshape(*x.shape[:-1], w.shape[0])


def layernorm_modulate_int8_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """layernorm_modulate_ref (rounded to x's dtype, as the unfused path stores it), then per-token
    int8 quantization: (q [B*L, C] int8, scale fp32 [B*L])."""
    y = layernorm_modulate_ref(x, shift, scale, eps)  # [B, L, C]
    return int8_quantize_ref(y.reshape(-1, y.shape[-1]))


def gated_residual_layernorm_modulate_int8_ref(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gated_residual_layernorm_modulate_ref with h quantized per token as it is stored:
    (r [B, L, C] in x.dtype, q [B*L, C] int8, scale fp32 [B*L])."""
    r, h = gated_residual_layernorm_modulate_ref(x, gate, y, shift, scale, eps)
    q, q_scale = int8_quantize_ref(h.reshape(-1, h.shape[-1]))
    return r, q, q_scale
