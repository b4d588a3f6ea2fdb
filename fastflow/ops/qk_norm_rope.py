"""fastflow::qk_norm_rope and fastflow::qk_norm: split the fused qkv GEMM output into attention
layout [B, H, L, D], RMSNorm q and k per head, and (FLUX) rotate them by RoPE in fp32.

The fused kernel reads qkv once and writes q, k, v for attention: the largest non-GEMM saving of a
FLUX step (DESIGN.md section 3b). ``qk_norm`` is the SD3 form (no RoPE; no norm for SD3-medium).
``joint_qk_norm_rope`` does either for both streams of joint attention (FLUX txt | img, SD3
context | x) and writes them into one [B, H, La + Lb, D] set of tensors, so no torch.cat copies q, k and v again.
``qkv_norm_rope`` / ``joint_qkv_norm_rope`` are the same ops on separate q, k, v projections
([B, L, H*D] each, diffusers' to_q / to_k / to_v), the form the compile backend rewrites to.
"""

from ..errors import InputError
from ._registry import defop
from .reference import joint_qk_norm_rope_ref, joint_qkv_norm_rope_ref, qk_norm_ref, qk_norm_rope_ref, qkv_norm_rope_ref


def _check_qkv(qkv, num_heads):
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * num_heads):
        raise InputError(f"qkv must be [B, L, 3*H*D] with H={num_heads}, got {list(qkv.shape)}")


def _check_parts(q, k, v, num_heads):
    if q.ndim != 3 or q.shape[-1] % num_heads or k.shape != q.shape or v.shape != q.shape:
        raise InputError(
            f"q, k, v must be three [B, L, H*D] projections of one shape with H={num_heads}, got "
            f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _check_streams(a, b):
    """The two streams of joint attention (their qkv, or their q projections)."""
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2] or a.dtype != b.dtype:
        raise InputError(
            f"the two streams of joint attention must share batch, width and dtype, got "
            f"{list(a.shape)} {a.dtype} and {list(b.shape)} {b.dtype}"
        )


def _check_tables(cos, sin, tokens, half):
    if (cos is None) != (sin is None):
        raise InputError("pass both RoPE tables (cos and sin) or neither")
    if cos is not None and (cos.shape != (tokens, half) or sin.shape != (tokens, half)):
        raise InputError(
            f"RoPE tables must be [{tokens}, {half}] (one row per token, one angle per pair), "
            f"got cos {list(cos.shape)} and sin {list(sin.shape)}"
        )


def _half(x, num_heads, parts=3):
    """D / 2 of a fused qkv (parts=3) or of one projection (parts=1)."""
    return x.shape[-1] // (parts * num_heads) // 2


def _heads(x, num_heads, tokens, parts=3):
    """Three new [B, H, tokens, D] tensors for the heads of a fused qkv [B, L, 3*H*D] (parts=3) or
    of one projection [B, L, H*D] (parts=1)."""
    shape = (x.shape[0], num_heads, tokens, x.shape[-1] // (parts * num_heads))
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape)


def _check_rope(qkv, q_scale, k_scale, cos, sin, num_heads, eps):
    _check_qkv(qkv, num_heads)
    _check_tables(cos, sin, qkv.shape[1], _half(qkv, num_heads))


def _fake_rope(qkv, q_scale, k_scale, cos, sin, num_heads, eps):
    return _fake(qkv, q_scale, k_scale, num_heads, eps)


def _fake(qkv, q_scale, k_scale, num_heads, eps):
    return _heads(qkv, num_heads, qkv.shape[1])


qk_norm_rope = defop(
    "qk_norm_rope",
    qk_norm_rope_ref,
    _fake_rope,
    impls={
        "triton": "fastflow.kernels.qk_norm_rope:qk_norm_rope_fwd",
        "cuda_cpp": "fastflow.ops.cuda_cpp:qk_norm_rope",
    },
    check=_check_rope,
)
qk_norm = defop(
    "qk_norm",
    qk_norm_ref,
    _fake,
    impls={"triton": "fastflow.kernels.qk_norm_rope:qk_norm_fwd"},
    check=lambda qkv, q_scale, k_scale, num_heads, eps: _check_qkv(qkv, num_heads),
)


def _check_joint(qkv_a, qkv_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads, eps):
    for qkv in (qkv_a, qkv_b):
        _check_qkv(qkv, num_heads)
    _check_streams(qkv_a, qkv_b)
    scales = (a_q_scale, a_k_scale, b_q_scale, b_k_scale)
    if cos is not None and sin is not None and any(s is None for s in scales):  # `in` would compare tensors
        raise InputError("joint_qk_norm_rope with RoPE needs the q and k norm scales of both streams")
    _check_tables(cos, sin, qkv_a.shape[1] + qkv_b.shape[1], _half(qkv_a, num_heads))


def _fake_joint(qkv_a, qkv_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads, eps):
    return _heads(qkv_a, num_heads, qkv_a.shape[1] + qkv_b.shape[1])


joint_qk_norm_rope = defop(
    "joint_qk_norm_rope",
    joint_qk_norm_rope_ref,
    _fake_joint,
    impls={"triton": "fastflow.kernels.qk_norm_rope:joint_qk_norm_rope_fwd"},
    check=_check_joint,
)


def _check_qkv_parts(q, k, v, q_scale, k_scale, cos, sin, num_heads, eps):
    _check_parts(q, k, v, num_heads)
    _check_tables(cos, sin, q.shape[1], _half(q, num_heads, parts=1))


qkv_norm_rope = defop(
    "qkv_norm_rope",
    qkv_norm_rope_ref,
    lambda q, k, v, q_scale, k_scale, cos, sin, num_heads, eps: _heads(q, num_heads, q.shape[1], parts=1),
    impls={"triton": "fastflow.kernels.qk_norm_rope:qkv_norm_rope_fwd"},
    check=_check_qkv_parts,
)


def _check_joint_parts(q_a, k_a, v_a, q_b, k_b, v_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin,
                       num_heads, eps):  # fmt: skip
    _check_parts(q_a, k_a, v_a, num_heads)
    _check_parts(q_b, k_b, v_b, num_heads)
    _check_streams(q_a, q_b)
    _check_tables(cos, sin, q_a.shape[1] + q_b.shape[1], _half(q_a, num_heads, parts=1))


joint_qkv_norm_rope = defop(
    "joint_qkv_norm_rope",
    joint_qkv_norm_rope_ref,
    lambda q_a, k_a, v_a, q_b, *rest: _heads(q_a, rest[-2], q_a.shape[1] + q_b.shape[1], parts=1),
    impls={"triton": "fastflow.kernels.qk_norm_rope:joint_qkv_norm_rope_fwd"},
    check=_check_joint_parts,
)
