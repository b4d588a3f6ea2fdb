"""fastflow::gelu_tanh: GELU, tanh approximation (every FLUX/SD3 transformer MLP)."""

from __future__ import annotations

import torch

from ._backend import use_reference, use_triton
from .reference import gelu_tanh_ref


@torch.library.custom_op("fastflow::gelu_tanh", mutates_args=())
def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return gelu_tanh_ref(x)


@_gelu_tanh.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _triton(x):
    from fastflow.kernels.gelu_tanh import gelu_tanh_fwd

    return gelu_tanh_fwd(x)


_gelu_tanh.register_kernel("cuda")(_triton)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))), math in fp32; any shape, returns x.dtype."""
    if use_reference(x):
        return gelu_tanh_ref(x)
    if use_triton():
        return _triton(x)
    return _gelu_tanh(x)
