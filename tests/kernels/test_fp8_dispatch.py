"""Which GEMM an FP8 layer runs on a GPU, decided off the GPU (a fake compute capability, CPU tensors
under the interpreter): plain layers (no fused epilogue) go through torch._scaled_mm with row-wise
scales on sm_89 / sm_90 / sm_100; the GELU epilogue, fp16 models and other GPUs keep the Triton
GEMM. torch._scaled_mm runs on CPU in this torch, so the dispatched result is checked too."""

import pytest
import torch

import fastflow.ops as ops
import fastflow.ops.fp8 as fp8_ops
from fastflow.kernels import fp8_gemm
from fastflow.ops import reference as ref
from fastflow.quant import Fp8Linear

from ._numerics import rand


@pytest.fixture
def gpu(monkeypatch):
    """Sets the fake capability; records torch._scaled_mm and the Triton GEMM's entry points."""
    calls = {"scaled_mm": [], "triton": []}
    real = torch._scaled_mm

    def scaled_mm(*args, **kwargs):
        calls["scaled_mm"].append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    for name in ("fp8_linear_fwd", "fp8_scaled_mm_fwd"):
        real_fn = getattr(fp8_gemm, name)
        monkeypatch.setattr(fp8_gemm, name, lambda *a, _f=real_fn: calls["triton"].append(a) or _f(*a))

    def set_capability(cap):
        monkeypatch.setattr(fp8_ops, "capability", lambda device: cap)
        return calls

    return set_capability


def _layer(n=48, k=64, activation="per-token", granularity="per-channel", dtype=torch.bfloat16):
    lin = torch.nn.Linear(k, n, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(7)) * 0.1)
    layer = Fp8Linear.from_linear(lin, granularity, activation)
    layer.bias.data = layer.bias.data.to(dtype)
    if activation == "static":
        layer.input_scale.fill_(0.02)
    return layer


def _expected(x, layer, gelu=False):
    static = layer.input_scale if layer.activation == "static" else None
    per_token = layer.activation == "per-token"
    return ref.fp8_linear_ref(x, layer.weight, layer.weight_scale, layer.bias, static, per_token, gelu)


@pytest.mark.parametrize("cap", [(8, 9), (9, 0), (10, 0)])
def test_plain_layers_use_scaled_mm_with_rowwise_scales(gpu, cap):
    calls = gpu(cap)
    layer = _layer()
    x = rand(2, 5, 64, dtype=torch.bfloat16, scale=2.0)
    with ops.use_backend("triton"):
        y = ops.linear(x, layer)
    assert len(calls["scaled_mm"]) == 1 and not calls["triton"]
    (a, b), kw = calls["scaled_mm"][0]
    assert a.dtype == torch.float8_e4m3fn and a.shape == (10, 64)
    assert b.shape == (64, 48) and b.stride() == (1, 64)  # the weight, column-major
    assert kw["scale_a"].shape == (10, 1) and kw["scale_b"].shape == (1, 48)
    assert kw["scale_a"].dtype == kw["scale_b"].dtype == torch.float32
    assert kw["out_dtype"] == torch.bfloat16 and kw["use_fast_accum"] is False and kw["bias"] is layer.bias
    expected = _expected(x, layer)
    assert y.shape == expected.shape == (2, 5, 48) and y.dtype == torch.bfloat16
    # the same quantized activations (bit-exact quantizer); the GEMMs differ in the bf16 rounding only
    torch.testing.assert_close(y.float(), expected.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("activation,granularity", [("per-tensor", "per-channel"), ("static", "per-tensor")])
def test_single_scales_are_broadcast_to_rows(gpu, activation, granularity):
    calls = gpu((9, 0))
    layer = _layer(activation=activation, granularity=granularity)
    x = rand(7, 64, dtype=torch.bfloat16, scale=2.0)
    with ops.use_backend("triton"):
        y = ops.linear(x, layer)
    _, kw = calls["scaled_mm"][0]
    assert kw["scale_a"].shape == (7, 1) and kw["scale_b"].shape == (1, 48)
    torch.testing.assert_close(y.float(), _expected(x, layer).float(), rtol=1.6e-2, atol=1e-2)


def test_the_modulated_path_feeds_scaled_mm(gpu):
    calls = gpu((9, 0))
    layer = _layer()
    x = rand(1, 6, 64, dtype=torch.bfloat16, scale=2.0)
    shift, scale = rand(1, 64, dtype=torch.bfloat16, seed=1), rand(1, 64, dtype=torch.bfloat16, seed=2)
    with ops.use_backend("triton"):
        y = ops.modulated_linear(x, shift, scale, layer)
    assert len(calls["scaled_mm"]) == 1 and not calls["triton"]
    expected = ref.fp8_linear_ref(ref.layernorm_modulate_ref(x, shift, scale, 1e-6), layer.weight, layer.weight_scale,
                                  layer.bias)  # fmt: skip
    torch.testing.assert_close(y.float(), expected.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize(
    "cap,epilogue,dtype",
    [
        ((9, 0), "gelu_tanh", torch.bfloat16),  # the fused GELU epilogue stays in the Triton GEMM
        ((9, 0), None, torch.float16),  # the row-wise kernels write bf16 only
        ((8, 0), None, torch.bfloat16),  # no FP8 tensor cores (the Triton launcher refuses too)
        ((12, 0), None, torch.bfloat16),  # not in the row-wise list
        (None, None, torch.bfloat16),  # off CUDA
    ],
)
def test_other_layers_keep_the_triton_gemm(gpu, cap, epilogue, dtype):
    calls = gpu(cap)
    layer = _layer(dtype=dtype)
    x = rand(3, 64, dtype=dtype, scale=2.0)
    with ops.use_backend("triton"):
        y = ops.linear(x, layer, epilogue)
    assert not calls["scaled_mm"] and calls["triton"]
    expected = _expected(x, layer, epilogue == "gelu_tanh")
    torch.testing.assert_close(y.float(), expected.float(), rtol=1.6e-2, atol=1e-2)


def test_unaligned_shapes_keep_the_triton_path(gpu):
    calls = gpu((9, 0))
    layer = _layer(n=40)  # N not a multiple of 16
    with ops.use_backend("triton"):
        ops.linear(rand(3, 64, dtype=torch.bfloat16), layer)
    assert not calls["scaled_mm"]


def _mlp_expected(x, first, second):
    h = _expected(x, first).to(x.dtype)  # mlp.0 without epilogue, bf16 out
    return _expected(ref.gelu_tanh_ref(h), second)


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "after_residual"])
def test_the_mlp_gelu_moves_into_the_quantizer_of_mlp2(gpu, monkeypatch, gated):
    """Both MLP layers through torch._scaled_mm, the GELU in mlp.2's quantizer (one fused pass):
    before, mlp.0's GELU epilogue kept it on the Triton GEMM."""
    import fastflow.quant.fp8 as quant_fp8
    from fastflow.models.flux import MLP

    calls = gpu((9, 0))
    fused = []
    real = quant_fp8.gelu_tanh_fp8_quantize

    def spy(x):
        fused.append((x.shape, ops.kernel_would_run("gelu_tanh_fp8_quantize", x)))
        return real(x)

    monkeypatch.setattr(quant_fp8, "gelu_tanh_fp8_quantize", spy)
    first, second = _layer(n=96, k=64), _layer(n=64, k=96)
    mlp = MLP(first, torch.nn.Identity(), second)
    x = rand(2, 5, 64, dtype=torch.bfloat16, scale=2.0)
    with ops.use_backend("triton"):
        if gated:
            zeros = torch.zeros(2, 64, dtype=torch.bfloat16)
            r, y = mlp.after_residual(x, zeros, x, zeros, zeros)  # r = x, LN(x) feeds mlp.0
            x = ref.layernorm_modulate_ref(x, zeros, zeros, 1e-6)
        else:
            y = mlp(x)
    assert len(calls["scaled_mm"]) == 2 and not calls["triton"] and fused == [((10, 96), True)]
    torch.testing.assert_close(y.float(), _mlp_expected(x, first, second).float(), rtol=3e-2, atol=3e-2)


def test_the_gelu_stays_in_the_epilogue_where_scaled_mm_does_not_run(gpu):
    from fastflow.models.flux import MLP

    calls = gpu((8, 0))  # no row-wise _scaled_mm here
    first, second = _layer(n=96, k=64), _layer(n=64, k=96)
    x = rand(2, 5, 64, dtype=torch.bfloat16, scale=2.0)
    with ops.use_backend("triton"):
        MLP(first, torch.nn.Identity(), second)(x)
    assert not calls["scaled_mm"] and calls["triton"]  # both layers on the Triton GEMM, GELU in its epilogue
