"""What the quantized linear layers (:class:`~fastflow.quant.Fp8Linear`,
:class:`~fastflow.quant.Int8Linear`) share: filling one from an ``nn.Linear`` and turning one back
into an ``nn.Linear``; each passes its own weight quantizer / dequantizer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def fill_from_linear(new: nn.Module, layer: nn.Linear, quantize: Callable) -> nn.Module:
    """``new``'s weight codes and ``weight_scale`` from ``quantize(layer.weight)``, its bias a copy of
    ``layer``'s (nothing to fill on the meta device). Returns ``new``."""
    if layer.weight.device.type != "meta":
        new.weight.data, new.weight_scale = quantize(layer.weight.detach())
        if layer.bias is not None:
            new.bias.data = layer.bias.detach().clone()
    return new


def dequantized_linear(module: nn.Module, dequantize: Callable, dtype: torch.dtype | None) -> nn.Linear:
    """An nn.Linear holding ``dequantize(weight, weight_scale, dtype)`` (``dtype`` default: the bias
    dtype, else bfloat16) and the bias in that dtype."""
    dtype = dtype or (module.bias.dtype if module.bias is not None else torch.bfloat16)
    layer = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta", dtype=dtype)
    layer.weight = nn.Parameter(dequantize(module.weight, module.weight_scale, dtype), requires_grad=False)
    if module.bias is not None:
        layer.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return layer
