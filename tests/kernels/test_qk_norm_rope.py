"""qk_norm_rope kernel(s) under the Triton interpreter vs the reference (tolerance rule: _numerics.py)."""

import pytest
import torch

from fastflow.ops import reference as ref

from ._numerics import DTYPES, check, guarded, rand


def _rope_tables(seq, half, seed=3):
    angles = torch.rand(seq, half, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 50
    return guarded(angles.cos().float()), guarded(angles.sin().float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,head_dim,seq", [(3, 128, 9), (2, 64, 5), (1, 32, 1)])
def test_qk_norm_rope(heads, head_dim, seq, dtype):
    from fastflow.kernels.qk_norm_rope import qk_norm_rope_fwd

    qkv = rand(2, seq, 3 * heads * head_dim, dtype=dtype, scale=2.0)
    qs, ks = rand(head_dim, dtype=dtype, seed=1, offset=1.0), rand(head_dim, dtype=dtype, seed=2, offset=1.0)
    cos, sin = _rope_tables(seq, head_dim // 2)
    out = qk_norm_rope_fwd(qkv, qs, ks, cos, sin, heads, 1e-6)
    check(out, lambda *a: ref.qk_norm_rope_ref(*a), (qkv, qs, ks, cos, sin, heads, 1e-6), dtype)


def test_qk_norm_rope_on_a_single_block_slice():
    """FLUX single blocks hand over a strided slice of linear1's output [qkv | mlp]."""
    from fastflow.kernels.qk_norm_rope import qk_norm_rope_fwd

    heads, d, seq = 2, 64, 6
    fused = rand(1, seq, 3 * heads * d + 96, dtype=torch.bfloat16)
    qkv = fused[..., : 3 * heads * d]
    qs, ks = rand(d, dtype=torch.float32, seed=1, offset=1.0), rand(d, dtype=torch.float32, seed=2, offset=1.0)
    cos, sin = _rope_tables(seq, d // 2)
    check(
        qk_norm_rope_fwd(qkv, qs, ks, cos, sin, heads, 1e-6),
        ref.qk_norm_rope_ref,
        (qkv, qs, ks, cos, sin, heads, 1e-6),
        torch.bfloat16,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norms", ["qk", "none", "q", "k"])
def test_qk_norm_without_rope(norms, dtype):
    """Each of q and k is normalised where its scale is given (the kernel once keyed both on q's)."""
    from fastflow.kernels.qk_norm_rope import qk_norm_rope_fwd

    heads, d, seq = 3, 64, 7
    qkv = rand(2, seq, 3 * heads * d, dtype=dtype)
    scales = (
        rand(d, dtype=dtype, seed=1, offset=1.0) if "q" in norms else None,
        rand(d, dtype=dtype, seed=2, offset=1.0) if "k" in norms else None,
    )
    out = qk_norm_rope_fwd(qkv, *scales, None, None, heads, 1e-6)
    check(out, ref.qk_norm_ref, (qkv, *scales, heads, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope", [True, False], ids=["flux", "sd3"])
def test_joint_streams_into_one_buffer(rope, dtype):
    """Both streams of joint attention (odd lengths 5 + 11, their own norm scales) written into one
    [B, H, 16, D] set: equal to the per-stream ops joined, every token written once."""
    from fastflow.kernels.qk_norm_rope import joint_qk_norm_rope_fwd

    heads, d = 3, 64
    a, b = rand(2, 5, 3 * heads * d, dtype=dtype), rand(2, 11, 3 * heads * d, dtype=dtype, seed=4)
    scales = [rand(d, dtype=dtype, seed=s, offset=1.0) for s in (5, 6, 7, 8)]
    cos, sin = _rope_tables(16, d // 2) if rope else (None, None)
    args = (a, b, *scales, cos, sin, heads, 1e-6)
    check(joint_qk_norm_rope_fwd(*args), ref.joint_qk_norm_rope_ref, args, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope", [True, False], ids=["flux", "sd3.5"])
def test_separate_projections(rope, dtype):
    """diffusers' form: q, k, v from three projections (one of them a strided view, as a slice of a
    wider GEMM output would be), both streams of joint attention, odd lengths 5 + 11."""
    from fastflow.kernels.qk_norm_rope import joint_qkv_norm_rope_fwd, qkv_norm_rope_fwd

    heads, d = 3, 64
    a = [rand(2, 5, heads * d, dtype=dtype, seed=s) for s in (1, 2, 3)]
    wide = rand(2, 11, 2 * heads * d, dtype=dtype, seed=4)
    b = [rand(2, 11, heads * d, dtype=dtype, seed=s) for s in (5, 6)] + [wide[..., heads * d :]]
    scales = [rand(d, dtype=dtype, seed=s, offset=1.0) for s in (7, 8, 9, 10)]
    cos, sin = _rope_tables(16, d // 2) if rope else (None, None)
    args = (*a, *b, *scales, cos, sin, heads, 1e-6)
    check(joint_qkv_norm_rope_fwd(*args), ref.joint_qkv_norm_rope_ref, args, dtype)
    single = (*b, *scales[:2], cos[5:] if rope else None, sin[5:] if rope else None, heads, 1e-6)
    check(qkv_norm_rope_fwd(*single), ref.qkv_norm_rope_ref, single, dtype)
