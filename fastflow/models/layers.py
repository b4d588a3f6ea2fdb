"""Pieces shared by the FLUX and SD3 transformers."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..errors import InputError


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10_000) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of an already scaled t [B] -> [B, dim], in t's dtype.

    The sinusoid is evaluated in fp32 from t as given; FLUX rounds t to bf16 before (see
    ``Flux.conditioning``), SD3 feeds fp32 sigma * 1000.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


class GELUTanh(nn.Module):
    """Kept for the official module layout (``img_mlp.1``); the MLPs run GELU as ``ops.linear``'s epilogue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_tanh(x)


def batch_shared_ids(ids: torch.Tensor, n_axes: int, what: str) -> torch.Tensor:
    """Position ids [L, n] or BFL/diffusers-style batched [B, L, n] (one grid shared by the batch)
    -> [L, n]."""
    if ids.ndim == 3:
        if not torch.compiler.is_compiling() and ids.shape[0] > 1 and not bool((ids == ids[:1]).all()):
            raise InputError(f"{what} differ between samples; fastflow shares one position grid across the batch")
        ids = ids[0]
    if ids.ndim != 2 or ids.shape[-1] != n_axes:
        raise InputError(f"{what} must be [L, {n_axes}] or [B, L, {n_axes}], got {list(ids.shape)}")
    return ids


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, seq, d = x.shape
    return x.transpose(1, 2).reshape(b, seq, h * d)  # [B, H, L, D] -> [B, L, H*D]
