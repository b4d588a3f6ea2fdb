"""fastflow::attention: scaled-dot-product attention on [B, H, L, D] (no mask, no dropout)."""

from __future__ import annotations

import torch

from ._backend import use_reference, use_triton
from .reference import attention_ref


@torch.library.custom_op("fastflow::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    return attention_ref(q, k, v, scale)


@_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _triton(q, k, v, scale):
    from fastflow.kernels.attention import attention_fwd, supported

    # head dims other than 64 / 128 (e.g. the VAE's 512) go to torch SDPA (flash / mem-efficient)
    return attention_fwd(q, k, v, scale) if supported(q) else attention_ref(q, k, v, scale)


_attention.register_kernel("cuda")(_triton)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v. q [B, H, Lq, D], k/v [B, H, Lk, D]; scale defaults to 1/sqrt(D)."""
    if use_reference(q, k, v):
        return attention_ref(q, k, v, scale)
    if use_triton():
        return _triton(q, k, v, scale)
    return _attention(q, k, v, scale)
