"""Every Triton kernel on CPU tensors under the interpreter, against the plain-torch reference.

Tolerance (flash-attention's rule): max|kernel - ref32| <= 2 * max|ref_lowp - ref32| + floor, where
ref32 is the reference on fp32 copies of the inputs and ref_lowp the reference in the test dtype.
Inputs sit inside NaN guard bands, so an out-of-bounds read shows up as NaN.
"""

import pytest
import torch

from fastflow.ops import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def guarded(t: torch.Tensor, pad: int = 64) -> torch.Tensor:
    """A contiguous copy of t living inside a buffer whose borders are NaN."""
    buf = torch.full((t.numel() + 2 * pad,), float("nan"), dtype=t.dtype)
    buf[pad : pad + t.numel()] = t.reshape(-1)
    return buf[pad : pad + t.numel()].view(t.shape)


def rand(*shape, dtype, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return guarded((torch.randn(shape, generator=g) * scale + offset).to(dtype))


def check(kernel_out, reference_fn, inputs, dtype):
    """Apply the tolerance rule to one output or a tuple of outputs."""
    up = [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    ref32, reflow = reference_fn(*up), reference_fn(*inputs)
    outs = kernel_out if isinstance(kernel_out, tuple) else (kernel_out,)
    ref32 = ref32 if isinstance(ref32, tuple) else (ref32,)
    reflow = reflow if isinstance(reflow, tuple) else (reflow,)
    for out, r32, rlo in zip(outs, ref32, reflow, strict=True):
        assert out.dtype == dtype and out.shape == r32.shape
        assert torch.isfinite(out).all(), "NaN/Inf: out-of-bounds read or overflow"
        err = (out.float() - r32.float()).abs().max().item()
        budget = 2 * (rlo.float() - r32.float()).abs().max().item() + FLOOR[dtype]
        worst = (out.float() - r32.float()).abs().flatten().argmax().item()
        assert err <= budget, f"max err {err:.3e} > {budget:.3e} at flat index {worst}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 3072), (1, 5, 769), (2, 1, 64)], ids=lambda s: "x".join(map(str, s)))
def test_layernorm_modulate(shape, dtype):
    from fastflow.kernels.layernorm_modulate import layernorm_modulate_fwd

    b, _, c = shape
    x = rand(*shape, dtype=dtype, scale=3.0, offset=1.0)
    shift, scale = rand(b, c, dtype=dtype, seed=1), rand(b, c, dtype=dtype, seed=2)
    check(layernorm_modulate_fwd(x, shift, scale, 1e-6), ref.layernorm_modulate_ref, (x, shift, scale, 1e-6), dtype)


def test_layernorm_modulate_strided_rows():
    from fastflow.kernels.layernorm_modulate import layernorm_modulate_fwd

    x = rand(2, 4, 200, dtype=torch.float32)[:, :, :96]  # row stride 200, last dim contiguous
    shift, scale = rand(2, 96, dtype=torch.float32, seed=1), rand(2, 96, dtype=torch.float32, seed=2)
    check(
        layernorm_modulate_fwd(x, shift, scale, 1e-6),
        ref.layernorm_modulate_ref,
        (x, shift, scale, 1e-6),
        torch.float32,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 3072), (1, 7, 769)], ids=lambda s: "x".join(map(str, s)))
def test_gated_residual(shape, dtype):
    from fastflow.kernels.gated_residual import gated_residual_fwd

    x, y = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype, seed=1)
    gate = rand(shape[0], shape[2], dtype=dtype, seed=2)
    check(gated_residual_fwd(x, gate, y), ref.gated_residual_ref, (x, gate, y), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [5125, 12288 * 2, 7])
def test_gelu_tanh(n, dtype):
    from fastflow.kernels.gelu_tanh import gelu_tanh_fwd

    x = rand(n, dtype=dtype, scale=4.0)
    check(gelu_tanh_fwd(x), ref.gelu_tanh_ref, (x,), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 128, 16, 16), (2, 64, 7, 5), (1, 512, 4, 6)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_groupnorm_silu(shape, dtype, channels_last):
    from fastflow.kernels.groupnorm_silu import groupnorm_silu_fwd

    x = rand(*shape, dtype=dtype, scale=2.0, offset=0.5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = rand(shape[1], dtype=dtype, seed=1, offset=1.0), rand(shape[1], dtype=dtype, seed=2)
    out = groupnorm_silu_fwd(x, w, b, 32, 1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    check(out, ref.groupnorm_silu_ref, (x, w, b, 32, 1e-6), dtype)


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
@pytest.mark.parametrize("with_norm", [True, False], ids=["rms", "split"])
def test_qk_norm_without_rope(with_norm, dtype):
    from fastflow.kernels.qk_norm_rope import qk_norm_rope_fwd

    heads, d, seq = 3, 64, 7
    qkv = rand(2, seq, 3 * heads * d, dtype=dtype)
    scales = (
        (rand(d, dtype=dtype, seed=1, offset=1.0), rand(d, dtype=dtype, seed=2, offset=1.0))
        if with_norm
        else (None, None)
    )
    out = qk_norm_rope_fwd(qkv, *scales, None, None, heads, 1e-6)
    check(out, ref.qk_norm_ref, (qkv, *scales, heads, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 3072), (1, 5, 769)], ids=lambda s: "x".join(map(str, s)))
def test_gated_residual_layernorm_modulate(shape, dtype):
    from fastflow.kernels.gated_residual_layernorm_modulate import gated_residual_layernorm_modulate_fwd

    b, _, c = shape
    x, y = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype, seed=1)
    gate, shift, scale = (rand(b, c, dtype=dtype, seed=s) for s in (2, 3, 4))
    out = gated_residual_layernorm_modulate_fwd(x, gate, y, shift, scale, 1e-6)
    check(out, ref.gated_residual_layernorm_modulate_ref, (x, gate, y, shift, scale, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 2, 70, 64, 45), (1, 1, 33, 128, 100), (2, 1, 1, 64, 1)], ids=lambda s: "x".join(map(str, s))
)
def test_attention(shape, dtype):
    """Odd query / key lengths (masked tails), M != N, head dims 64 and 128."""
    from fastflow.kernels.attention import attention_fwd

    b, h, m, d, n = shape
    q, k, v = (
        rand(b, h, m, d, dtype=dtype),
        rand(b, h, n, d, dtype=dtype, seed=1),
        rand(b, h, n, d, dtype=dtype, seed=2),
    )
    check(attention_fwd(q, k, v, None), ref.attention_ref, (q, k, v, None), dtype)


def test_attention_strided_inputs():
    """q/k/v as produced by a [B, L, H, D] -> [B, H, L, D] transpose (not contiguous)."""
    from fastflow.kernels.attention import attention_fwd

    q, k, v = (rand(1, 40, 2, 64, dtype=torch.bfloat16, seed=s).transpose(1, 2) for s in range(3))
    check(attention_fwd(q, k, v, 0.1), ref.attention_ref, (q, k, v, 0.1), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 12288), (5, 769)], ids=lambda s: "x".join(map(str, s)))
def test_bias_gelu_tanh(shape, dtype):
    from fastflow.kernels.gelu_tanh import bias_gelu_tanh_fwd

    x, bias = rand(*shape, dtype=dtype, scale=3.0), rand(shape[-1], dtype=dtype, seed=1)
    check(bias_gelu_tanh_fwd(x, bias), ref.bias_gelu_tanh_ref, (x, bias), dtype)
