"""fastflow::layernorm_modulate: (1 + scale) * LayerNorm(x) + shift (no affine, fp32 statistics)."""

from __future__ import annotations

import torch

from ._backend import use_reference, use_triton
from .reference import layernorm_modulate_ref


@torch.library.custom_op("fastflow::layernorm_modulate", mutates_args=())
def _layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return layernorm_modulate_ref(x, shift, scale, eps)


@_layernorm_modulate.register_fake
def _(x, shift, scale, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _triton(x, shift, scale, eps):
    from fastflow.kernels.layernorm_modulate import layernorm_modulate_fwd

    return layernorm_modulate_fwd(x, shift, scale, eps)


_layernorm_modulate.register_kernel("cuda")(_triton)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(1 + scale) * LN(x) + shift. x [B, L, C]; shift, scale [B, C]; returns [B, L, C] in x.dtype."""
    if use_reference(x, shift, scale):
        return layernorm_modulate_ref(x, shift, scale, eps)
    if use_triton():
        return _triton(x, shift, scale, eps)
    return _layernorm_modulate(x, shift, scale, eps)
