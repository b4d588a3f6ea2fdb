"""Pieces shared by the FLUX and SD3 transformers."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10_000) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of an already scaled t [B] -> [B, dim], in t's dtype.

    The sinusoid is evaluated in fp32 from t as given; FLUX rounds t to bf16 before (see
    ``Flux.conditioning``), SD3 feeds fp32 sigma * 1000.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


def bias_gelu_linear(up: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """GELU_tanh(up(x)). Where a kernel runs (CUDA tensors, or the "triton" backend) the bias is
    added inside the activation kernel, one pass fewer; elsewhere (CPU, training) the plain
    Linear + GELU, so CPU numerics and the embedded model's training stay those of the reference."""
    if x.is_cuda or ops.get_backend() == "triton":
        return ops.bias_gelu_tanh(torch.nn.functional.linear(x, up.weight), up.bias)
    return ops.gelu_tanh(up(x))


class GELUTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_tanh(x)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, seq, d = x.shape
    return x.transpose(1, 2).reshape(b, seq, h * d)  # [B, H, L, D] -> [B, L, H*D]
