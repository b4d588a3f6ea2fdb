"""fastflow::bias_gelu_tanh: GELU_tanh(x + bias) on the MLP up-projection's output (bias-free GEMM),
so the bias add and the activation cost one pass instead of two."""

from __future__ import annotations

import torch

from ._backend import use_reference, use_triton
from .reference import bias_gelu_tanh_ref


@torch.library.custom_op("fastflow::bias_gelu_tanh", mutates_args=())
def _bias_gelu_tanh(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return bias_gelu_tanh_ref(x, bias)


@_bias_gelu_tanh.register_fake
def _(x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _triton(x, bias):
    from fastflow.kernels.gelu_tanh import bias_gelu_tanh_fwd

    return bias_gelu_tanh_fwd(x, bias)


_bias_gelu_tanh.register_kernel("cuda")(_triton)


def bias_gelu_tanh(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU_tanh(x + bias); x [..., N], bias [N]; math in fp32, returns x.dtype."""
    if use_reference(x, bias):
        return bias_gelu_tanh_ref(x, bias)
    if use_triton():
        return _triton(x, bias)
    return _bias_gelu_tanh(x, bias)
