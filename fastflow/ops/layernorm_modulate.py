"""fastflow::layernorm_modulate: (1 + scale) * LayerNorm(x) + shift (no affine, fp32 statistics)."""

import torch

from ._registry import defop
from .reference import layernorm_modulate_ref


def _fake(x, shift, scale, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


layernorm_modulate = defop(
    "layernorm_modulate",
    layernorm_modulate_ref,
    _fake,
    impls={"triton": "fastflow.kernels.layernorm_modulate:layernorm_modulate_fwd"},
)
