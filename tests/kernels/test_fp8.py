"""FP8 kernels under the Triton interpreter: activation quantization (alone and fused after modulated
LayerNorm) bit-exact against the reference, and the scaled GEMM within the tolerance rule against
the dequantized fp32 reference, with odd M, N and K, every scale granularity, bias and GELU, and the
tile configurations shipped for sm_89 / sm_90 executed too."""

import pytest
import torch

import fastflow.ops as ops
from fastflow.ops import reference as ref

from ._numerics import DEVICE, FLOOR, rand

FP8 = torch.float8_e4m3fn
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bits(t):
    return t.view(torch.uint8) if t.dtype == FP8 else t


def _same_bits(got, expected):
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        diff = (_bits(g) != _bits(e)).nonzero()
        assert diff.numel() == 0, f"{len(diff)} elements differ, first at {diff[0].tolist()}"


def _fp8(*shape, seed, outliers=False):
    """A quantized operand (with its per-row scale) inside a NaN guard band (0x7F is e4m3 NaN)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if outliers:
        x[:, ::7] *= 30.0
    q, s = ref.fp8_quantize_ref(x, None, True)
    buf = torch.full((q.numel() + 128,), 0x7F, dtype=torch.uint8)
    buf[64 : 64 + q.numel()] = q.view(torch.uint8).reshape(-1)
    buf = buf.to(DEVICE)  # compiled on a GPU (TRITON_INTERPRET=0), CPU tensors under the interpreter
    return buf[64 : 64 + q.numel()].view(FP8).view(shape), s.to(DEVICE)


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["per-token", "per-tensor", "static"])
@pytest.mark.parametrize("shape", [(7, 100), (1, 769), (3, 3072)], ids=lambda s: "x".join(map(str, s)))
def test_quantize_is_bit_exact(shape, mode, dtype):
    from fastflow.kernels.fp8_quantize import fp8_quantize_fwd

    x = rand(*shape, dtype=dtype, scale=4.0)
    x.view(-1)[5] = 900.0  # beyond e4m3's range once scaled by a static scale: clamped
    static = torch.tensor([0.5], device=DEVICE) if mode == "static" else None
    args = (x, static, mode == "per-token")
    _same_bits(fp8_quantize_fwd(*args), ref.fp8_quantize_ref(*args))


def test_quantize_zero_rows_and_strided_input():
    from fastflow.kernels.fp8_quantize import fp8_quantize_fwd

    x = rand(4, 200, dtype=torch.float32)[:, :96]  # row stride 200
    x[1] = 0.0
    q, s = fp8_quantize_fwd(x, None, True)
    _same_bits((q, s), ref.fp8_quantize_ref(x, None, True))
    assert q[1].float().abs().max() == 0 and torch.isfinite(s).all() and s[1] > 0


def same_with_nans(got, expected):
    """Equal to the reference including where NaN sits: NaN codes / scales at the same positions
    (their sign bit may differ), every other code and scale bit for bit."""
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        g_nan, e_nan = g.float().isnan(), e.float().isnan()
        where = g_nan.nonzero().tolist()[:5], e_nan.nonzero().tolist()[:5]
        assert torch.equal(g_nan, e_nan), f"NaN at {where[0]}, reference at {where[1]}"
        assert torch.equal(_bits(g)[~g_nan], _bits(e)[~e_nan])


def _with_nonfinite(dtype):
    x = rand(5, 96, dtype=dtype, scale=3.0).clone()
    x[0, 7] = float("nan")  # a NaN row: NaN scale, every code NaN
    x[1, 3] = float("inf")  # Inf: scale Inf, codes 0 and NaN where the Inf was
    x[2, 90] = -float("inf")
    x[3, 0], x[3, 1] = float("nan"), float("inf")
    return x  # row 4 finite


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["per-token", "per-tensor", "static"])
def test_quantize_propagates_nan_and_inf_as_the_reference(mode, dtype):
    from fastflow.kernels.fp8_quantize import fp8_quantize_fwd

    x = _with_nonfinite(dtype)
    args = (x, torch.tensor([0.5], device=DEVICE) if mode == "static" else None, mode == "per-token")
    got, expected = fp8_quantize_fwd(*args), ref.fp8_quantize_ref(*args)
    same_with_nans(got, expected)
    assert got[0].float().isnan().any()  # never a finite code for a NaN input


def test_fused_quantizers_propagate_nan_as_the_reference():
    from fastflow.kernels.fp8_quantize import gated_residual_layernorm_modulate_fp8_fwd, layernorm_modulate_fp8_fwd

    x = _with_nonfinite(torch.bfloat16).reshape(1, 5, 96)
    shift, scale, gate = (rand(1, 96, dtype=torch.bfloat16, seed=s) for s in (1, 2, 3))
    same_with_nans(layernorm_modulate_fp8_fwd(x, shift, scale, 1e-6), ref.layernorm_modulate_fp8_ref(x, shift, scale))
    y = rand(1, 5, 96, dtype=torch.bfloat16, seed=4)
    same_with_nans(
        gated_residual_layernorm_modulate_fp8_fwd(x, gate, y, shift, scale, 1e-6),
        ref.gated_residual_layernorm_modulate_fp8_ref(x, gate, y, shift, scale),
    )


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 3072), (1, 5, 769)], ids=lambda s: "x".join(map(str, s)))
def test_layernorm_modulate_fp8_equals_the_unfused_kernels(shape, dtype):
    """Fused = LayerNorm-modulate kernel then quantize kernel, bit for bit; and within FP8's rounding
    (half a step: 1/16 of the row's amax at most) of the reference LayerNorm."""
    from fastflow.kernels.fp8_quantize import fp8_quantize_fwd, layernorm_modulate_fp8_fwd
    from fastflow.kernels.layernorm_modulate import layernorm_modulate_fwd

    b, _, c = shape
    x = rand(*shape, dtype=dtype, scale=3.0, offset=1.0)
    shift, scale = rand(b, c, dtype=dtype, seed=1), rand(b, c, dtype=dtype, seed=2)
    q, q_scale = layernorm_modulate_fp8_fwd(x, shift, scale, 1e-6)
    unfused = fp8_quantize_fwd(layernorm_modulate_fwd(x, shift, scale, 1e-6).reshape(-1, c), None, True)
    _same_bits((q, q_scale), unfused)
    y = ref.layernorm_modulate_ref(x, shift, scale, 1e-6).float().reshape(-1, c)
    err = (q.float() * q_scale[:, None] - y).abs().amax(dim=1)
    assert (err <= y.abs().amax(dim=1) / 16 * 1.001).all()


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
def test_gated_residual_layernorm_modulate_fp8_equals_the_unfused_kernels(dtype):
    from fastflow.kernels.fp8_quantize import fp8_quantize_fwd, gated_residual_layernorm_modulate_fp8_fwd
    from fastflow.kernels.gated_residual_layernorm_modulate import gated_residual_layernorm_modulate_fwd

    b, seq, c = 2, 3, 769
    x, y = rand(b, seq, c, dtype=dtype, scale=2.0), rand(b, seq, c, dtype=dtype, seed=3)
    gate, shift, scale = (rand(b, c, dtype=dtype, seed=s) for s in (4, 5, 6))
    r, q, q_scale = gated_residual_layernorm_modulate_fp8_fwd(x, gate, y, shift, scale, 1e-6)
    r_ref, h = gated_residual_layernorm_modulate_fwd(x, gate, y, shift, scale, 1e-6)
    _same_bits((r, q, q_scale), (r_ref, *fp8_quantize_fwd(h.reshape(-1, c), None, True)))


def _check_gemm(got, args, out_dtype):
    """Tolerance rule: max|kernel - ref32| <= 2 * max|ref_out_dtype - ref32| + floor."""
    ref32 = ref.fp8_scaled_mm_ref(*args, torch.float32)
    reflow = ref.fp8_scaled_mm_ref(*args, out_dtype)
    assert got.dtype == out_dtype and got.shape == ref32.shape
    assert torch.isfinite(got).all(), "NaN/Inf: out-of-bounds read"
    err = (got.float() - ref32).abs()
    budget = 2 * (reflow.float() - ref32).abs().max().item() + FLOOR[out_dtype] * ref32.abs().max().item()
    assert err.max().item() <= budget, (
        f"max err {err.max():.3e} > {budget:.3e} at {divmod(err.argmax().item(), got.shape[1])}"
    )


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "m,k,n,per_token,per_channel,bias,gelu",
    [
        (37, 80, 45, True, True, True, False),  # odd M and N, K a multiple of 16 but not of BLOCK_K
        (1, 64, 33, True, True, True, True),  # one token (modulation), GELU epilogue
        (70, 48, 96, False, False, False, False),  # per-tensor scales, no bias
        (33, 112, 17, True, False, True, True),
    ],
)
def test_scaled_mm(m, k, n, per_token, per_channel, bias, gelu, out_dtype):
    from fastflow.kernels.fp8_gemm import fp8_scaled_mm_fwd

    a, a_scale = _fp8(m, k, seed=0, outliers=True)
    b, b_scale = _fp8(n, k, seed=1)
    a_scale = a_scale if per_token else a_scale.max().reshape(1)
    b_scale = b_scale if per_channel else b_scale.max().reshape(1)
    bias_t = rand(n, dtype=out_dtype, seed=2) if bias else None
    args = (a, a_scale, b, b_scale, bias_t, gelu)
    _check_gemm(fp8_scaled_mm_fwd(*args, out_dtype), args, out_dtype)


def test_k_not_a_multiple_of_16_runs_the_reference():
    from fastflow.kernels.fp8_gemm import fp8_scaled_mm_fwd, supported

    a, a_scale = _fp8(5, 100, seed=0)
    b, b_scale = _fp8(7, 100, seed=1)
    assert not supported(a, b)
    a16, _ = _fp8(5, 112, seed=0)
    b16, _ = _fp8(8, 112, seed=1)
    assert supported(a16, b16) and not supported(a16[:, 1:97], b16[:, :96]) and not supported(a16, b16[1:, 1:])
    args = (a, a_scale, b, b_scale, None, False, torch.bfloat16)
    assert fp8_scaled_mm_fwd(*args) is NotImplemented  # the op's registry runs the reference
    with ops.use_backend("triton"):
        assert torch.equal(ops.fp8_scaled_mm(*args), ref.fp8_scaled_mm_ref(*args))


@pytest.mark.parametrize("arch", [89, 90, 100, 120])
@pytest.mark.parametrize("m", [130, 40], ids=["large", "small"])
def test_shipped_gpu_tiles_run(arch, m):
    """The tile configurations the GPUs run (not the interpreter default), on ragged shapes."""
    from fastflow.kernels.fp8_gemm import plan

    if DEVICE == "cuda" and arch != (lambda c: 10 * c[0] + c[1])(torch.cuda.get_device_capability()):
        pytest.skip("on a GPU, only its own architecture's tiles launch")

    a, a_scale = _fp8(m, 272, seed=0, outliers=True)
    b, b_scale = _fp8(300, 272, seed=1)
    bias = rand(300, dtype=torch.bfloat16, seed=2)
    launch = plan(a, a_scale, b, b_scale, bias, True, torch.bfloat16, arch=arch)
    assert launch.meta["BLOCK_M"] >= 64
    launch.meta = {k: v for k, v in launch.meta.items() if k not in ("num_warps", "num_stages")}
    _check_gemm(launch(), (a, a_scale, b, b_scale, bias, True), torch.bfloat16)


def test_fp8_linear_end_to_end():
    from fastflow.kernels.fp8_gemm import fp8_linear_fwd

    x = rand(2, 9, 96, dtype=torch.bfloat16, scale=2.0)
    w, w_scale = ref.fp8_quantize_ref(torch.randn(40, 96, device=DEVICE), None, True)
    bias = rand(40, dtype=torch.bfloat16, seed=3)
    got = fp8_linear_fwd(x, w, w_scale, bias, None, True, False)
    expected = ref.fp8_linear_ref(x, w, w_scale, bias, None, True, False)
    assert got.shape == (2, 9, 40)
    # same quantized activations; the GEMM differs from the reference only by summation order
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
