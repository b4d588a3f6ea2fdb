"""fastflow::gated_residual: x + gate * y with the gate broadcast over tokens."""

from __future__ import annotations

import torch

from ._backend import use_reference, use_triton
from .reference import gated_residual_ref


@torch.library.custom_op("fastflow::gated_residual", mutates_args=())
def _gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return gated_residual_ref(x, gate, y)


@_gated_residual.register_fake
def _(x, gate, y):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _triton(x, gate, y):
    from fastflow.kernels.gated_residual import gated_residual_fwd

    return gated_residual_fwd(x, gate, y)


_gated_residual.register_kernel("cuda")(_triton)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate[:, None, :] * y. x, y [B, L, C]; gate [B, C]; returns x.dtype."""
    if use_reference(x, gate, y):
        return gated_residual_ref(x, gate, y)
    if use_triton():
        return _triton(x, gate, y)
    return _gated_residual(x, gate, y)
