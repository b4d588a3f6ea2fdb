"""fastflow::qk_norm_rope and fastflow::qk_norm: split the fused qkv GEMM output into attention
layout [B, H, L, D], RMSNorm q and k per head, and (FLUX) rotate them by RoPE in fp32.

The fused kernel reads qkv once and writes q, k, v for attention: the largest non-GEMM saving of a
FLUX step (DESIGN.md section 3b). ``qk_norm`` is the SD3 form (no RoPE; no norm for SD3-medium).
"""

from ..errors import InputError
from ._registry import defop
from .reference import qk_norm_ref, qk_norm_rope_ref


def _check_qkv(qkv, num_heads):
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * num_heads):
        raise InputError(f"qkv must be [B, L, 3*H*D] with H={num_heads}, got {list(qkv.shape)}")


def _check_rope(qkv, q_scale, k_scale, cos, sin, num_heads, eps):
    _check_qkv(qkv, num_heads)
    seq, half = qkv.shape[1], qkv.shape[-1] // (3 * num_heads) // 2
    if cos.shape != (seq, half) or sin.shape != (seq, half):
        raise InputError(
            f"RoPE tables must be [{seq}, {half}] for qkv {list(qkv.shape)}, "
            f"got cos {list(cos.shape)} and sin {list(sin.shape)}"
        )


def _fake_rope(qkv, q_scale, k_scale, cos, sin, num_heads, eps):
    return _fake(qkv, q_scale, k_scale, num_heads, eps)


def _fake(qkv, q_scale, k_scale, num_heads, eps):
    b, seq, width = qkv.shape
    shape = (b, num_heads, seq, width // (3 * num_heads))
    return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)


qk_norm_rope = defop(
    "qk_norm_rope",
    qk_norm_rope_ref,
    _fake_rope,
    impls={"triton": "fastflow.kernels.qk_norm_rope:qk_norm_rope_fwd"},
    check=_check_rope,
)
qk_norm = defop(
    "qk_norm",
    qk_norm_ref,
    _fake,
    impls={"triton": "fastflow.kernels.qk_norm_rope:qk_norm_fwd"},
    check=lambda qkv, q_scale, k_scale, num_heads, eps: _check_qkv(qkv, num_heads),
)
