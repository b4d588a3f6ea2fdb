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


def _heads(qkv, num_heads, seq):
    """Three new [B, H, seq, D] tensors for the q, k, v of qkv [B, L, 3*H*D]."""
    shape = (qkv.shape[0], num_heads, seq, qkv.shape[-1] // (3 * num_heads))
    return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)


def _fake(qkv, q_scale, k_scale, num_heads, eps):
    return _heads(qkv, num_heads, qkv.shape[1])


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


def _check_joint(qkv_a, qkv_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads, eps):
    for qkv in (qkv_a, qkv_b):
        _check_qkv(qkv, num_heads)
    if qkv_a.shape[0] != qkv_b.shape[0] or qkv_a.shape[2] != qkv_b.shape[2] or qkv_a.dtype != qkv_b.dtype:
        raise InputError(
            f"the two streams of joint attention must share batch, width and dtype, got "
            f"{list(qkv_a.shape)} {qkv_a.dtype} and {list(qkv_b.shape)} {qkv_b.dtype}"
        )
    if (cos is None) != (sin is None):
        raise InputError("pass both RoPE tables (cos and sin) or neither")
    if cos is not None:
        if None in (a_q_scale, a_k_scale, b_q_scale, b_k_scale):
            raise InputError("joint_qk_norm_rope with RoPE needs the q and k norm scales of both streams")
        tokens, half = qkv_a.shape[1] + qkv_b.shape[1], qkv_a.shape[-1] // (3 * num_heads) // 2
        if cos.shape != (tokens, half) or sin.shape != (tokens, half):
            raise InputError(
                f"RoPE tables must be [{tokens}, {half}] (both streams' tokens), "
                f"got cos {list(cos.shape)} and sin {list(sin.shape)}"
            )


def _fake_joint(qkv_a, qkv_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads, eps):
    return _heads(qkv_a, num_heads, qkv_a.shape[1] + qkv_b.shape[1])


joint_qk_norm_rope = defop(
    "joint_qk_norm_rope",
    joint_qk_norm_rope_ref,
    _fake_joint,
    impls={"triton": "fastflow.kernels.qk_norm_rope:joint_qk_norm_rope_fwd"},
    check=_check_joint,
)


def _check_parts(q, k, v, num_heads):
    if q.ndim != 3 or q.shape[-1] % num_heads or k.shape != q.shape or v.shape != q.shape:
        raise InputError(
            f"q, k, v must be three [B, L, H*D] projections of one shape with H={num_heads}, got "
            f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _check_tables(cos, sin, tokens, half):
    if (cos is None) != (sin is None):
        raise InputError("pass both RoPE tables (cos and sin) or neither")
    if cos is not None and (cos.shape != (tokens, half) or sin.shape != (tokens, half)):
        raise InputError(
            f"RoPE tables must be [{tokens}, {half}] (one row per token, one angle per pair), "
            f"got cos {list(cos.shape)} and sin {list(sin.shape)}"
        )


def _check_qkv_parts(q, k, v, q_scale, k_scale, cos, sin, num_heads, eps):
    _check_parts(q, k, v, num_heads)
    _check_tables(cos, sin, q.shape[1], q.shape[-1] // num_heads // 2)


def _heads_of(q, num_heads, tokens):
    shape = (q.shape[0], num_heads, tokens, q.shape[-1] // num_heads)
    return q.new_empty(shape), q.new_empty(shape), q.new_empty(shape)


qkv_norm_rope = defop(
    "qkv_norm_rope",
    qkv_norm_rope_ref,
    lambda q, k, v, q_scale, k_scale, cos, sin, num_heads, eps: _heads_of(q, num_heads, q.shape[1]),
    impls={"triton": "fastflow.kernels.qk_norm_rope:qkv_norm_rope_fwd"},
    check=_check_qkv_parts,
)


def _check_joint_parts(q_a, k_a, v_a, q_b, k_b, v_b, a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin,
                       num_heads, eps):  # fmt: skip
    _check_parts(q_a, k_a, v_a, num_heads)
    _check_parts(q_b, k_b, v_b, num_heads)
    if q_a.shape[0] != q_b.shape[0] or q_a.shape[2] != q_b.shape[2] or q_a.dtype != q_b.dtype:
        raise InputError(
            f"the two streams of joint attention must share batch, width and dtype, got "
            f"{list(q_a.shape)} {q_a.dtype} and {list(q_b.shape)} {q_b.dtype}"
        )
    _check_tables(cos, sin, q_a.shape[1] + q_b.shape[1], q_a.shape[-1] // num_heads // 2)


joint_qkv_norm_rope = defop(
    "joint_qkv_norm_rope",
    joint_qkv_norm_rope_ref,
    lambda q_a, k_a, v_a, q_b, *rest: _heads_of(q_a, rest[-2], q_a.shape[1] + q_b.shape[1]),
    impls={"triton": "fastflow.kernels.qk_norm_rope:joint_qkv_norm_rope_fwd"},
    check=_check_joint_parts,
)
