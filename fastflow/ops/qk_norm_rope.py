"""fastflow::qk_norm_rope: split fused qkv, RMSNorm q and k per head, FLUX RoPE in fp32.

The fused kernel reads the qkv GEMM output once and writes q, k, v in attention layout; this is
the largest non-GEMM saving of a FLUX step (DESIGN.md section 3b).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ._backend import use_reference, use_triton
from .reference import qk_norm_rope_ref


@torch.library.custom_op("fastflow::qk_norm_rope", mutates_args=())
def _qk_norm_rope(
    qkv: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qk_norm_rope_ref(qkv, q_scale, k_scale, cos, sin, num_heads, eps)


@_qk_norm_rope.register_fake
def _(qkv, q_scale, k_scale, cos, sin, num_heads, eps):
    b, seq, width = qkv.shape
    head_dim = width // (3 * num_heads)
    shape = (b, num_heads, seq, head_dim)
    return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)


def _triton(qkv, q_scale, k_scale, cos, sin, num_heads, eps):
    from fastflow.kernels.qk_norm_rope import qk_norm_rope_fwd

    return qk_norm_rope_fwd(qkv, q_scale, k_scale, cos, sin, num_heads, eps)


_qk_norm_rope.register_kernel("cuda")(_triton)


def qk_norm_rope(
    qkv: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, L, 3*H*D] ((K H D) layout) -> q, k, v [B, H, L, D] in qkv.dtype.

    q and k: RMSNorm over D with learnable scales q_scale/k_scale [D], then rotation of interleaved
    pairs by the angles whose cos/sin [L, D/2] (fp32) are given.
    """
    b, seq, width = qkv.shape
    if width % (3 * num_heads):
        raise InputError(f"qkv width {width} is not a multiple of 3 * num_heads ({3 * num_heads})")
    half = width // (3 * num_heads) // 2
    if cos.shape != (seq, half) or sin.shape != (seq, half):
        raise InputError(
            f"RoPE tables must be [{seq}, {half}] for qkv {list(qkv.shape)}, "
            f"got cos {list(cos.shape)} and sin {list(sin.shape)}"
        )
    if use_reference(qkv, q_scale, k_scale):
        return qk_norm_rope_ref(qkv, q_scale, k_scale, cos, sin, num_heads, eps)
    if use_triton():
        return _triton(qkv, q_scale, k_scale, cos, sin, num_heads, eps)
    return _qk_norm_rope(qkv, q_scale, k_scale, cos, sin, num_heads, eps)
