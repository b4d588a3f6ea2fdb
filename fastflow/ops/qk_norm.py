"""fastflow::qk_norm: split fused qkv into attention layout, RMSNorm q and k (no RoPE; SD3/SD3.5)."""

from __future__ import annotations

import torch

from ..errors import InputError
from ._backend import use_reference, use_triton
from .reference import qk_norm_ref


@torch.library.custom_op("fastflow::qk_norm", mutates_args=())
def _qk_norm(
    qkv: torch.Tensor, q_scale: torch.Tensor | None, k_scale: torch.Tensor | None, num_heads: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qk_norm_ref(qkv, q_scale, k_scale, num_heads, eps)


@_qk_norm.register_fake
def _(qkv, q_scale, k_scale, num_heads, eps):
    b, seq, width = qkv.shape
    shape = (b, num_heads, seq, width // (3 * num_heads))
    return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)


def _triton(qkv, q_scale, k_scale, num_heads, eps):
    from fastflow.kernels.qk_norm_rope import qk_norm_rope_fwd

    return qk_norm_rope_fwd(qkv, q_scale, k_scale, None, None, num_heads, eps)


_qk_norm.register_kernel("cuda")(_triton)


def qk_norm(
    qkv: torch.Tensor,
    q_scale: torch.Tensor | None,
    k_scale: torch.Tensor | None,
    num_heads: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, L, 3*H*D] ((K H D) layout) -> q, k, v [B, H, L, D] in qkv.dtype.

    q and k are RMS-normalised over D (fp32 statistics) and scaled by q_scale/k_scale [D] where
    those are given; with None (SD3-medium has no qk-norm) they are only split.
    """
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * num_heads):
        raise InputError(f"qkv must be [B, L, 3*H*D] with H={num_heads}, got {list(qkv.shape)}")
    tensors = [t for t in (qkv, q_scale, k_scale) if t is not None]
    if use_reference(*tensors):
        return qk_norm_ref(qkv, q_scale, k_scale, num_heads, eps)
    if use_triton():
        return _triton(qkv, q_scale, k_scale, num_heads, eps)
    return _qk_norm(qkv, q_scale, k_scale, num_heads, eps)
