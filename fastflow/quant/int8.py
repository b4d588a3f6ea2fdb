"""The int8 (W8A8) linear layer: symmetric int8 weights with one fp32 scale per output channel,
bias in the model dtype, activations quantized per token at run time, the product through the
int8 GEMM (``torch._int_mm``: oneDNN VNNI / AMX on CPU, int8 tensor cores on CUDA sm_80+) with the
scales and bias applied to its int32 result in fp32.

Registered with :func:`fastflow.ops.register_linear` (and the modulated / gated-residual entry
points, which quantize where the LayerNorm writes), so models need no change.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..ops.int8 import (
    gated_residual_layernorm_modulate_int8,
    int8_linear,
    int8_scaled_mm,
    layernorm_modulate_int8,
)
from ..ops.linear import register_gated_modulated_linear, register_linear, register_modulated_linear
from ..ops.reference_int8 import INT8_MIN_AMAX, int8_codes, int8_scales
from .quantized_linear import dequantized_linear, fill_from_linear

CHUNK = 1 << 22  # elements per fp32 temporary while quantizing (16 MB)


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype) -> (int8 [N, K], fp32 scale [N]) with w ~= q * scale[:, None],
    per output channel, symmetric (codes in [-127, 127]). Works through row chunks, so the fp32
    temporaries stay small next to a large weight. The codes come back column-major (``q.t()``
    contiguous: the layout the CPU's int8 GEMM reads fastest)."""
    rows = max(1, CHUNK // max(1, w.shape[1]))
    chunks = range(0, w.shape[0], rows)
    amax = torch.cat(
        [torch.linalg.vector_norm(w[i : i + rows], float("inf"), dim=1, dtype=torch.float32) for i in chunks]
    )  # [N]
    if not torch.isfinite(amax).all():
        raise InputError("cannot quantize a weight holding NaN or Inf")
    inv, scale = int8_scales(amax.clamp(min=INT8_MIN_AMAX))
    q = torch.empty(w.shape[::-1], dtype=torch.int8, device=w.device).t()  # [N, K], column-major
    for i in chunks:
        q[i : i + rows] = int8_codes(w[i : i + rows], inv[i : i + rows, None])
    return q, scale


def dequantize_weight_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes x scale in ``dtype``: q [N, K] int8, scale fp32 [N]; one fp32 copy."""
    out = q.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return out.mul_(scale.float().reshape(-1, 1)).to(dtype)


def column_major(q: torch.Tensor) -> torch.Tensor:
    """``q`` [N, K] with ``q.t()`` contiguous (a copy unless it already is)."""
    return q if q.t().is_contiguous() else column_major_copy(q, q.device)


def column_major_copy(q: torch.Tensor, device) -> torch.Tensor:
    """A copy of ``q`` [N, K] on ``device`` with ``.t()`` contiguous (always a copy: safe from a
    memory map)."""
    return torch.empty(q.shape[::-1], dtype=q.dtype, device=device).t().copy_(q)


class Int8Linear(nn.Module):
    """y = (x quantized per token) @ (weight * weight_scale)^T + bias. weight [N, K] int8 (held
    column-major), weight_scale fp32 [N]."""

    weight_granularity = "per-channel"
    activation = "per-token"

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.bfloat16, device=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        codes = torch.empty(in_features, out_features, dtype=torch.int8, device=device).t()  # [N, K]
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        # a checkpoint's row-major codes (load_state_dict(assign=True)) are laid out column-major once
        self.register_load_state_dict_post_hook(lambda module, _: module._lay_out())

    def _lay_out(self) -> None:
        if self.weight.device.type != "meta" and not self.weight.t().is_contiguous():
            self.weight = nn.Parameter(column_major(self.weight.data), requires_grad=False)

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Int8Linear:
        dtype = layer.bias.dtype if layer.bias is not None else layer.weight.dtype
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, dtype, layer.weight.device)
        return fill_from_linear(new, layer, quantize_weight_int8)

    def dequantized(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An nn.Linear holding the dequantized weights (in ``dtype``, default the bias dtype)."""
        return dequantized_linear(self, dequantize_weight_int8, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _int8_linear(x, self, None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _check_epilogue(epilogue: str | None) -> bool:
    if epilogue not in (None, "gelu_tanh"):
        raise InputError(f"unknown linear epilogue {epilogue!r}; choose None or 'gelu_tanh'")
    return epilogue == "gelu_tanh"


@register_linear(Int8Linear)
def _int8_linear(x: torch.Tensor, layer: Int8Linear, epilogue: str | None) -> torch.Tensor:
    return int8_linear(x, layer.weight, layer.weight_scale, layer.bias, _check_epilogue(epilogue))


def _gemm(xq, x_scale, layer: Int8Linear, epilogue, like: torch.Tensor) -> torch.Tensor:
    gelu = _check_epilogue(epilogue)
    y = int8_scaled_mm(xq, x_scale, layer.weight, layer.weight_scale, layer.bias, gelu, like.dtype)  # [M, N]
    return y.reshape(*like.shape[:-1], layer.out_features)  # [B, L, N]


# The LayerNorm's output is quantized in the same op that writes it (one entry point, the same
# numbers as LayerNorm then Int8Linear: the rounding to the model dtype is kept).
@register_modulated_linear(Int8Linear)
def _int8_modulated_linear(x, shift, scale, eps, layer: Int8Linear, epilogue):
    xq, x_scale = layernorm_modulate_int8(x, shift, scale, eps)  # [B*L, C], [B*L]
    return _gemm(xq, x_scale, layer, epilogue, x)


@register_gated_modulated_linear(Int8Linear)
def _int8_gated_modulated_linear(x, gate, y, shift, scale, eps, layer: Int8Linear, epilogue):
    r, xq, x_scale = gated_residual_layernorm_modulate_int8(x, gate, y, shift, scale, eps)
    return r, _gemm(xq, x_scale, layer, epilogue, x)
