"""fastflow::gated_residual_layernorm_modulate: r = x + gate * y, h = (1 + scale) * LN(r) + shift.

The FLUX / SD3 sub-block boundary: one read of x and y, two writes (r for the next residual, h for
the next sub-block's GEMM) instead of two kernels and a re-read of r.
"""

import torch

from ._registry import defop
from .reference import gated_residual_layernorm_modulate_ref


def _fake(x, gate, y, shift, scale, eps):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(2))


gated_residual_layernorm_modulate = defop(
    "gated_residual_layernorm_modulate",
    gated_residual_layernorm_modulate_ref,
    _fake,
    impls={"triton": "fastflow.kernels.gated_residual_layernorm_modulate:gated_residual_layernorm_modulate_fwd"},
)
