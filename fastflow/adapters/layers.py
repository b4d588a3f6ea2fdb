"""The layer side of LoRA: :class:`Piece` (one low-rank product on a row range of a target
layer) and :class:`LoraLinear` (a base linear layer plus its unfused adapters, run through
:func:`fastflow.ops.linear`). Below both the file formats (:mod:`.formats`) and the manager
(:mod:`.lora`), which use them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import _apply_epilogue, linear, register_linear


@dataclass
class Piece:
    """One LoRA product for rows [row, row + up.shape[0]) of a target layer's output."""

    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [rows, r]
    scale: float  # alpha / r
    row: int
    key: str  # the file's module name, for messages
    bias: torch.Tensor | None = None  # [rows]: lora_B's bias (BFL's control LoRAs), scaled like the product


class LoraLinear(nn.Module):
    """A base linear layer plus the unfused LoRA adapters that target it."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.pieces: dict[str, list[Piece]] = {}  # adapter -> its pieces on this layer
        self.scales: dict[str, float] = {}
        out_features, in_features = base.weight.shape
        dtype = _compute_dtype(base)
        device = base.weight.device
        self.register_buffer("lora_down", torch.zeros(0, in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_up", torch.zeros(out_features, 0, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_scale", torch.zeros(0, dtype=dtype, device=device), persistent=False)
        # [out] when a piece has a lora_B bias (the scaled sum of the biases), else [0]
        self.register_buffer("lora_bias", torch.zeros(0, dtype=dtype, device=device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add(self, name: str, pieces: list[Piece], scale: float) -> None:
        self.pieces[name], self.scales[name] = pieces, scale
        self._stack()

    def remove(self, name: str) -> None:
        self.pieces.pop(name, None)
        self.scales.pop(name, None)
        self._stack()

    def set_scale(self, name: str, scale: float) -> None:
        """In place: the buffers keep their shapes (no recompile under torch.compile)."""
        self.scales[name] = scale
        self.lora_scale.copy_(self._scale_vector())
        if self.lora_bias.numel():
            self.lora_bias.copy_(self._bias_vector())

    def _scale_vector(self) -> torch.Tensor:
        values = [p.scale * self.scales[n] for n, ps in self.pieces.items() for p in ps for _ in range(p.down.shape[0])]
        return torch.tensor(values, dtype=self.lora_scale.dtype, device=self.lora_scale.device)

    def _bias_vector(self) -> torch.Tensor:
        """The pieces' lora_B biases times their scales, on their rows of the output (fp32 sum)."""
        out = torch.zeros(self.lora_up.shape[0], dtype=torch.float32, device=self.lora_bias.device)
        for n, ps in self.pieces.items():
            for p in ps:
                if p.bias is not None:
                    rows = slice(p.row, p.row + p.bias.shape[0])
                    out[rows] += (p.scale * self.scales[n]) * p.bias.to(out.device, torch.float32)
        return out.to(self.lora_bias.dtype)

    def _stack(self) -> None:
        """All adapters as one down [R, in] and a block up [out, R] (zero outside each piece's rows)."""
        dtype, device = self.lora_down.dtype, self.lora_down.device
        downs = [p.down for ps in self.pieces.values() for p in ps]
        rank = sum(d.shape[0] for d in downs)
        up = torch.zeros(self.lora_up.shape[0], rank, dtype=dtype, device=device)
        col = 0
        for ps in self.pieces.values():
            for p in ps:
                r = p.down.shape[0]
                up[p.row : p.row + p.up.shape[0], col : col + r] = p.up.to(device=device, dtype=dtype)
                col += r
        self.lora_down = torch.cat(downs).to(device=device, dtype=dtype) if downs else self.lora_down[:0]
        self.lora_up = up
        self.lora_scale = self._scale_vector()
        has_bias = any(p.bias is not None for ps in self.pieces.values() for p in ps)
        self.lora_bias = self._bias_vector() if has_bias else self.lora_bias[:0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _lora_linear(x, self, None)

    def extra_repr(self) -> str:
        return f"adapters={list(self.pieces)}, rank={self.lora_down.shape[0]}"


def _compute_dtype(layer: nn.Module) -> torch.dtype:
    bias = getattr(layer, "bias", None)
    if layer.weight.is_floating_point() and layer.weight.element_size() > 1:
        return layer.weight.dtype
    return bias.dtype if bias is not None else torch.bfloat16  # FP8 weights: the model dtype


@register_linear(LoraLinear)
def _lora_linear(x: torch.Tensor, layer: LoraLinear, epilogue: str | None) -> torch.Tensor:
    y = linear(x, layer.base)
    if layer.lora_down.shape[0]:
        h = F.linear(x.to(layer.lora_down.dtype), layer.lora_down) * layer.lora_scale
        y = y + F.linear(h, layer.lora_up, layer.lora_bias if layer.lora_bias.numel() else None).to(y.dtype)
    return _apply_epilogue(y, epilogue)
