"""fastflow::gated_residual_layernorm_modulate: r = x + gate * y, h = (1 + scale) * LN(r) + shift.

The FLUX / SD3 sub-block boundary: one read of x and y, two writes (r for the next residual, h for
the next sub-block's GEMM) instead of two kernels and a re-read of r.
"""

from __future__ import annotations

import torch

from ._backend import use_reference, use_triton
from .reference import gated_residual_layernorm_modulate_ref


@torch.library.custom_op("fastflow::gated_residual_layernorm_modulate", mutates_args=())
def _gated_residual_layernorm_modulate(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_layernorm_modulate_ref(x, gate, y, shift, scale, eps)


@_gated_residual_layernorm_modulate.register_fake
def _(x, gate, y, shift, scale, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        x, memory_format=torch.contiguous_format
    )


def _triton(x, gate, y, shift, scale, eps):
    from fastflow.kernels.gated_residual_layernorm_modulate import gated_residual_layernorm_modulate_fwd

    return gated_residual_layernorm_modulate_fwd(x, gate, y, shift, scale, eps)


_gated_residual_layernorm_modulate.register_kernel("cuda")(_triton)


def gated_residual_layernorm_modulate(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y [B, L, C]; gate, shift, scale [B, C] -> (x + gate * y, (1 + scale) * LN(that) + shift)."""
    if use_reference(x, gate, y, shift, scale):
        return gated_residual_layernorm_modulate_ref(x, gate, y, shift, scale, eps)
    if use_triton():
        return _triton(x, gate, y, shift, scale, eps)
    return _gated_residual_layernorm_modulate(x, gate, y, shift, scale, eps)
