"""fastflow::groupnorm_silu: SiLU(GroupNorm(x)), the VAE's most frequent memory-bound pair."""

import torch

from ..errors import InputError
from ._registry import defop
from .reference import groupnorm_silu_ref


def _check(x, weight, bias, num_groups, eps):
    if x.ndim < 3 or x.shape[1] % num_groups:
        raise InputError(f"groupnorm_silu needs [B, C, ...] with C divisible by {num_groups}, got {list(x.shape)}")


def _fake(x, weight, bias, num_groups, eps):
    return torch.empty_like(x)


groupnorm_silu = defop(
    "groupnorm_silu",
    groupnorm_silu_ref,
    _fake,
    impls={
        "triton": "fastflow.kernels.groupnorm_silu:groupnorm_silu_fwd",
        "cuda_cpp": "fastflow.ops.cuda_cpp:groupnorm_silu",  # NHWC (csrc/groupnorm_silu.cu)
    },
    check=_check,
)
