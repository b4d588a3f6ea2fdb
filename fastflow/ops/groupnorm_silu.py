"""fastflow::groupnorm_silu: SiLU(GroupNorm(x)), the VAE's most frequent memory-bound pair."""

from __future__ import annotations

import torch

from ..errors import InputError
from ._backend import use_reference, use_triton
from .reference import groupnorm_silu_ref


@torch.library.custom_op("fastflow::groupnorm_silu", mutates_args=())
def _groupnorm_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float
) -> torch.Tensor:
    return groupnorm_silu_ref(x, weight, bias, num_groups, eps)


@_groupnorm_silu.register_fake
def _(x, weight, bias, num_groups, eps):
    return torch.empty_like(x)


def _triton(x, weight, bias, num_groups, eps):
    from fastflow.kernels.groupnorm_silu import groupnorm_silu_fwd

    return groupnorm_silu_fwd(x, weight, bias, num_groups, eps)


_groupnorm_silu.register_kernel("cuda")(_triton)


def groupnorm_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int = 32, eps: float = 1e-6
) -> torch.Tensor:
    """SiLU(GroupNorm(x; num_groups, weight, bias, eps)); x [B, C, *spatial] with C divisible by
    num_groups; statistics in fp32; returns x.dtype."""
    if x.ndim < 3 or x.shape[1] % num_groups:
        raise InputError(f"groupnorm_silu needs [B, C, ...] with C divisible by {num_groups}, got {list(x.shape)}")
    if use_reference(x, weight, bias):
        return groupnorm_silu_ref(x, weight, bias, num_groups, eps)
    if use_triton():
        return _triton(x, weight, bias, num_groups, eps)
    return _groupnorm_silu(x, weight, bias, num_groups, eps)
