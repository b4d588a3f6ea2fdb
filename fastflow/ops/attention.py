"""fastflow::attention: scaled-dot-product attention on [B, H, L, D] (no mask, no dropout)."""

from __future__ import annotations

import torch

from ._backend import use_reference
from .reference import attention_ref


@torch.library.custom_op("fastflow::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    return attention_ref(q, k, v, scale)


@_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v. q [B, H, Lq, D], k/v [B, H, Lk, D]; scale defaults to 1/sqrt(D)."""
    if use_reference(q, k, v):
        return attention_ref(q, k, v, scale)
    return _attention(q, k, v, scale)
