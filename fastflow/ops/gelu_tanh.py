"""fastflow::gelu_tanh and fastflow::bias_gelu_tanh: GELU (tanh approximation), the latter after a
bias add, so the MLP's bias-free up-projection pays one pass for bias + activation instead of two."""

import torch

from ._registry import defop
from .reference import bias_gelu_tanh_ref, gelu_tanh_ref


def _fake(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_bias(x, bias):
    return _fake(x)


gelu_tanh = defop("gelu_tanh", gelu_tanh_ref, _fake, impls={"triton": "fastflow.kernels.gelu_tanh:gelu_tanh_fwd"})
bias_gelu_tanh = defop(
    "bias_gelu_tanh", bias_gelu_tanh_ref, _fake_bias, impls={"triton": "fastflow.kernels.gelu_tanh:bias_gelu_tanh_fwd"}
)
