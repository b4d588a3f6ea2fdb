"""fastflow::attention: scaled-dot-product attention on [B, H, L, D] (no mask, no dropout). Every
implementation returns [B, L, H, D] in memory seen as [B, H, L, D], so merging heads is a view."""

from ._registry import defop
from .reference import attention_ref


def _fake(q, k, v, scale):
    b, h, m, _ = q.shape
    d = v.shape[-1]  # the layout of reference.attention_layout; a fresh tensor, not a view
    return q.new_empty_strided((b, h, m, d), (m * h * d, d, h * d, 1))


# The GPU implementation is the tuned (or default-order) choice among fastflow's Triton kernel,
# FlashAttention-3, cuDNN and torch SDPA (attention_backends.py); the kernel report compiles the
# Triton kernel's module.
attention = defop(
    "attention",
    attention_ref,
    _fake,
    impls={"triton": "fastflow.ops.attention_backends:attention"},
    kernels=("fastflow.kernels.attention",),
)
