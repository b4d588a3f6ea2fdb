"""fastflow::geglu: GEGLU's gate, h * GELU(g) (exact GELU) of the projection [..., 2I] = [h | g]
(SDXL's feed-forward), in one pass."""

from ._registry import defop
from .reference import geglu_ref


def _fake(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


geglu = defop("geglu", geglu_ref, _fake, impls={"triton": "fastflow.kernels.geglu:geglu_fwd"})
