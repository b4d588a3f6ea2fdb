"""The FP8 linear layer: e4m3 weights with fp32 scales (per output channel or per tensor), bias in
the model dtype, activations quantized per token, per tensor or with a static (calibrated) scale.

Runs through ``fastflow::fp8_linear`` (or, after a modulated LayerNorm, the fused
``layernorm_modulate_fp8`` + ``fp8_scaled_mm``), registered with :func:`fastflow.ops.register_linear`
so models need no change.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..errors import InputError
from ..ops.fp8 import (
    fp8_linear,
    fp8_scaled_mm,
    gated_residual_layernorm_modulate_fp8,
    gelu_tanh_fp8_quantize,
    layernorm_modulate_fp8,
    scaled_mm_rowwise,
)
from ..ops.linear import (
    register_gated_modulated_linear,
    register_gelu_input,
    register_linear,
    register_modulated_linear,
)
from ..ops.reference import FP8_DTYPE, FP8_MAX, FP8_MIN_AMAX, fp8_scales
from .quantized_linear import dequantized_linear, fill_from_linear

WEIGHT_GRANULARITIES = ("per-channel", "per-tensor")
ACTIVATION_SCALINGS = ("per-token", "per-tensor", "static")


CHUNK = 1 << 22  # elements per fp32 temporary while quantizing (16 MB)


def quantize_weight(w: torch.Tensor, granularity: str = "per-channel") -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype) -> (e4m3 [N, K], fp32 scale [N] or [1]) with w ~= q * scale.
    Works through row chunks, so the fp32 temporaries stay small next to a large weight."""
    if granularity not in WEIGHT_GRANULARITIES:
        raise InputError(f"weight granularity {granularity!r}: choose one of {WEIGHT_GRANULARITIES}")
    rows = max(1, CHUNK // max(1, w.shape[1]))
    chunks = range(0, w.shape[0], rows)
    amax = torch.cat([w[i : i + rows].float().abs().amax(dim=1) for i in chunks]).clamp(min=FP8_MIN_AMAX)  # [N]
    if granularity == "per-tensor":
        amax = amax.amax().reshape(1)  # [1]
    if not torch.isfinite(amax).all():
        raise InputError("cannot quantize a weight holding NaN or Inf")
    inv, scale = fp8_scales(amax)
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    for i in chunks:
        part_inv = inv[i : i + rows, None] if granularity == "per-channel" else inv
        q[i : i + rows] = (w[i : i + rows].float() * part_inv).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes x scale in ``dtype``: q [N, ...] FP8, scale [N] (per output row) or [1]; one fp32 copy."""
    out = q.to(torch.float32, copy=True)
    return out.mul_(scale.float().reshape(-1, *([1] * (q.dim() - 1)))).to(dtype)


class Fp8Linear(nn.Module):
    """y = (x quantized) @ (weight * weight_scale)^T + bias. weight [N, K] e4m3, weight_scale fp32
    [N] (per channel) or [1]; input_scale fp32 [1] when activations use a static scale."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_granularity: str = "per-channel",
        activation: str = "per-token",
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        super().__init__()
        if activation not in ACTIVATION_SCALINGS:
            raise InputError(f"activation scaling {activation!r}: choose one of {ACTIVATION_SCALINGS}")
        if weight_granularity not in WEIGHT_GRANULARITIES:
            raise InputError(f"weight granularity {weight_granularity!r}: choose one of {WEIGHT_GRANULARITIES}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_granularity, self.activation = weight_granularity, activation
        scales = out_features if weight_granularity == "per-channel" else 1
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.ones(scales, dtype=torch.float32, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        self.register_buffer(
            "input_scale", torch.ones(1, dtype=torch.float32, device=device) if activation == "static" else None
        )

    @classmethod
    def from_linear(cls, layer: nn.Linear, weight_granularity: str = "per-channel", activation: str = "per-token"):
        dtype = layer.bias.dtype if layer.bias is not None else layer.weight.dtype
        new = cls(
            layer.in_features,
            layer.out_features,
            layer.bias is not None,
            weight_granularity,
            activation,
            dtype=dtype,
            device=layer.weight.device,
        )
        return fill_from_linear(new, layer, lambda w: quantize_weight(w, weight_granularity))

    def dequantized(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An nn.Linear holding the dequantized weights (in ``dtype``, default the bias dtype)."""
        return dequantized_linear(self, dequantize_weight, dtype)

    def _static_scale(self) -> torch.Tensor | None:
        return self.input_scale if self.activation == "static" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fp8_linear(x, self, None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight={self.weight_granularity}, activation={self.activation}"
        )


@register_linear(Fp8Linear)
def _fp8_linear(x: torch.Tensor, layer: Fp8Linear, epilogue: str | None) -> torch.Tensor:
    return fp8_linear(
        x,
        layer.weight,
        layer.weight_scale,
        layer.bias,
        layer._static_scale(),
        layer.activation == "per-token",
        epilogue == "gelu_tanh",
    )


def _gemm(xq, x_scale, layer: Fp8Linear, epilogue, like: torch.Tensor) -> torch.Tensor:
    y = fp8_scaled_mm(xq, x_scale, layer.weight, layer.weight_scale, layer.bias, epilogue == "gelu_tanh", like.dtype)
    return y.reshape(*like.shape[:-1], layer.out_features)  # [B, L, N]


# The fused paths write the quantized rows straight from the LayerNorm: one pass instead of a
# LayerNorm write, a quantize read and a quantize write. Only where their kernels run and the
# activations are scaled per token; elsewhere the unfused ops give the same numbers.
@register_modulated_linear(Fp8Linear)
def _fp8_modulated_linear(x, shift, scale, eps, layer: Fp8Linear, epilogue):
    if layer.activation == "per-token" and ops.kernel_would_run("layernorm_modulate_fp8", x):
        xq, x_scale = layernorm_modulate_fp8(x, shift, scale, eps)  # [B*L, C], [B*L]
        return _gemm(xq, x_scale, layer, epilogue, x)
    return _fp8_linear(ops.layernorm_modulate(x, shift, scale, eps), layer, epilogue)


@register_gated_modulated_linear(Fp8Linear)
def _fp8_gated_modulated_linear(x, gate, y, shift, scale, eps, layer: Fp8Linear, epilogue):
    if layer.activation == "per-token" and ops.kernel_would_run("gated_residual_layernorm_modulate_fp8", x):
        r, xq, x_scale = gated_residual_layernorm_modulate_fp8(x, gate, y, shift, scale, eps)
        return r, _gemm(xq, x_scale, layer, epilogue, x)
    r, h = ops.gated_residual_layernorm_modulate(x, gate, y, shift, scale, eps)
    return r, _fp8_linear(h, layer, epilogue)


@register_gelu_input(Fp8Linear)
def _gelu_fp8_linear(h, layer: Fp8Linear, probe):
    """mlp.2 of an MLP whose mlp.0 is FP8 too: GELU + per-token quantize in one pass (the kernel
    ``gelu_tanh_fp8_quantize``), so mlp.0 runs without an epilogue through torch._scaled_mm (the
    epilogue would keep it on the Triton GEMM) and the GELU costs no extra pass. ``probe`` (first, x):
    whether to move the GELU here."""
    if probe is not None:
        first, x = probe
        moves = (
            layer.activation == "per-token"
            and isinstance(first, Fp8Linear)
            and ops.kernel_would_run("gelu_tanh_fp8_quantize", x)
            and scaled_mm_rowwise(x, first.weight, x.dtype, False)
        )
        return True if moves else NotImplemented
    if layer.activation != "per-token" or not ops.kernel_would_run("gelu_tanh_fp8_quantize", h):
        return NotImplemented
    xq, x_scale = gelu_tanh_fp8_quantize(h.reshape(-1, h.shape[-1]))  # [M, K] e4m3, [M]
    return _gemm(xq, x_scale, layer, None, h)
