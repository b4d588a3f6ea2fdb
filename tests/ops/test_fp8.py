"""FP8 ops and layers on CPU: the op contract (opcheck, fullgraph compile, backends agree), the
reference against torch._scaled_mm, SQNR of Fp8Linear against the fp32 Linear, quantize_ /
dequantize_ / calibrate_, and the modulated path giving the same numbers as LayerNorm then linear.

Distributions for SQNR (FLUX-shaped layers, 3072 -> 3072): weights Student-t with 4 degrees of
freedom x 0.02 (heavy tails); activations standard normal with 8 outlier channels x 50 and
log-normal token norms (sigma 1); a second set with 4 "massive" tokens x 3e4 (DiT-style).
"""

import pytest
import torch
from torch import nn

import fastflow.ops as ops
from fastflow.errors import InputError
from fastflow.ops import reference as ref
from fastflow.ops.fp8 import scaled_mm_native
from fastflow.quant import (
    Fp8Config,
    Fp8Linear,
    calibrate_,
    dequantize_,
    fp8_layers,
    quantize_,
    skip_patterns,
    weight_bytes,
)

from ._checks import assert_op_contract

FP8 = torch.float8_e4m3fn


def _sqnr(expected, got, dim=None):
    """Signal-to-quantization-noise ratio in dB (the worst row when dim is given)."""
    if dim is None:
        return (20 * torch.log10(expected.norm() / (expected - got).norm())).item()
    return (20 * torch.log10(expected.norm(dim=dim) / (expected - got).norm(dim=dim))).min().item()


def _flux_layer(seed=0, k=3072, n=3072):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(k, n)
    t = torch.distributions.StudentT(torch.tensor(4.0))
    torch.manual_seed(seed)
    layer.weight.data = t.sample((n, k)) * 0.02
    layer.bias.data = torch.randn(n, generator=g) * 0.02
    return layer


def _activations(kind, m=96, k=3072, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if kind == "outlier channels":
        x[:, torch.randperm(k, generator=g)[:8]] *= 50.0
        x = x * torch.exp(torch.randn(m, 1, generator=g))
    else:  # massive tokens
        x[:4] *= 3e4
    return x


def _quantized(seed=0):
    w, w_scale = ref.fp8_quantize_ref(torch.randn(40, 64, generator=torch.Generator().manual_seed(seed)))
    return w, w_scale


def test_fp8_quantize_contract():
    x = torch.randn(7, 48)
    for static, per_token in ((None, True), (None, False), (torch.tensor([0.05]), True)):
        assert_op_contract(ops.fp8_quantize, torch.ops.fastflow.fp8_quantize.default, (x, static, per_token), fp8=True)


def test_fp8_scaled_mm_and_linear_contract():
    w, w_scale = _quantized()
    xq, x_scale = ref.fp8_quantize_ref(torch.randn(5, 64))
    bias = torch.randn(40, dtype=torch.bfloat16)
    args = (xq, x_scale, w, w_scale, bias, True, torch.bfloat16)
    assert_op_contract(ops.fp8_scaled_mm, torch.ops.fastflow.fp8_scaled_mm.default, args, fp8=True)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    args = (x, w, w_scale, bias, None, True, False)
    assert_op_contract(ops.fp8_linear, torch.ops.fastflow.fp8_linear.default, args, fp8=True)


def test_layernorm_modulate_fp8_contract():
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    shift, scale = torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(2, 64, dtype=torch.bfloat16)
    op = torch.ops.fastflow.layernorm_modulate_fp8.default
    assert_op_contract(ops.layernorm_modulate_fp8, op, (x, shift, scale, 1e-6), fp8=True)


@pytest.mark.parametrize("per_token,per_channel", [(True, True), (False, False), (True, False)])
def test_reference_agrees_with_torch_scaled_mm(per_token, per_channel):
    g = torch.Generator().manual_seed(0)  # fixed data: the sums' order differs, the tolerance is a few ulps
    w, w_scale = ref.fp8_quantize_ref(torch.randn(48, 64, generator=g), None, per_channel)
    xq, x_scale = ref.fp8_quantize_ref(torch.randn(9, 64, generator=g) * 5, None, per_token)
    bias = torch.randn(48, generator=g)
    expected = ref.fp8_scaled_mm_ref(xq, x_scale, w, w_scale, bias, False, torch.float32)
    got = scaled_mm_native(xq, x_scale, w, w_scale, bias, torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_quantize_rounds_to_nearest_and_clamps():
    x = torch.tensor([[448.0, -448.0, 1.97 * 448 / 448, 0.0, -1000.0]])
    q, scale = ref.fp8_quantize_ref(x, torch.tensor([1.0]))
    assert q.float().tolist() == [[448.0, -448.0, 2.0, 0.0, -448.0]]
    q, scale = ref.fp8_quantize_ref(torch.zeros(2, 8))
    assert torch.isfinite(scale).all() and q.float().abs().max() == 0


@pytest.mark.parametrize("weight", ["per-channel", "per-tensor"])
@pytest.mark.parametrize("activation", ["per-token", "per-tensor"])
def test_sqnr_on_flux_shaped_layers(weight, activation):
    layer = _flux_layer()
    x = _activations("outlier channels")
    expected = layer(x)
    got = Fp8Linear.from_linear(layer, weight, activation)(x)
    assert _sqnr(expected, got) >= 25.0


def test_per_token_scaling_keeps_small_tokens_next_to_massive_ones():
    layer = _flux_layer()
    x = _activations("massive tokens")
    expected = layer(x)
    per_token = _sqnr(expected, Fp8Linear.from_linear(layer, "per-channel", "per-token")(x), dim=-1)
    per_tensor = _sqnr(expected, Fp8Linear.from_linear(layer, "per-channel", "per-tensor")(x), dim=-1)
    # with one scale for all tokens the ordinary tokens fall into e4m3's subnormals
    assert per_token >= 25.0 and per_tensor < per_token - 10.0


def test_fp8_linear_is_what_ops_linear_runs_with_every_epilogue():
    layer = Fp8Linear.from_linear(nn.Linear(64, 40).to(torch.bfloat16))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for epilogue, gelu in ((None, False), ("gelu_tanh", True)):
        expected = ref.fp8_linear_ref(x, layer.weight, layer.weight_scale, layer.bias, None, True, gelu)
        assert torch.equal(ops.linear(x, layer, epilogue), expected)
    assert torch.equal(layer(x), ops.linear(x, layer))
    assert layer.weight.dtype == FP8 and layer.bias.dtype == torch.bfloat16 and layer.weight_scale.shape == (40,)


def test_gated_residual_layernorm_modulate_fp8_contract():
    x, y = torch.randn(2, 5, 64, dtype=torch.bfloat16), torch.randn(2, 5, 64, dtype=torch.bfloat16)
    vecs = tuple(torch.randn(2, 64, dtype=torch.bfloat16) for _ in range(3))
    op = torch.ops.fastflow.gated_residual_layernorm_modulate_fp8.default
    args = (x, vecs[0], y, vecs[1], vecs[2], 1e-6)
    assert_op_contract(ops.gated_residual_layernorm_modulate_fp8, op, args, fp8=True)


def test_gated_residual_modulated_linear_matches_the_unfused_ops():
    x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    gate, shift, scale = torch.randn(2, 64), torch.randn(2, 64), torch.randn(2, 64)
    for layer in (Fp8Linear.from_linear(nn.Linear(64, 40)), nn.Linear(64, 40)):
        r_ref, h = ops.gated_residual_layernorm_modulate(x, gate, y, shift, scale)
        expected = ops.linear(h, layer, "gelu_tanh")
        for backend in ("reference", "kernels"):
            with ops.use_backend(backend):
                r, out = ops.gated_residual_modulated_linear(x, gate, y, shift, scale, layer, "gelu_tanh")
            assert torch.equal(r, r_ref) and torch.equal(out, expected)


def test_modulated_linear_matches_layernorm_then_linear():
    layer = Fp8Linear.from_linear(nn.Linear(64, 40))
    x, shift, scale = torch.randn(2, 5, 64), torch.randn(2, 64), torch.randn(2, 64)
    expected = ops.linear(ops.layernorm_modulate(x, shift, scale), layer)
    for backend in ("reference", "kernels"):
        with ops.use_backend(backend):
            assert torch.equal(ops.modulated_linear(x, shift, scale, layer), expected)
    plain = nn.Linear(64, 40)
    torch.testing.assert_close(
        ops.modulated_linear(x, shift, scale, plain, "gelu_tanh"),
        ops.linear(ops.layernorm_modulate(x, shift, scale), plain, "gelu_tanh"),
    )


def test_calibrate_switches_layers_to_static_scales_it_measured():
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 8))
    quantize_(model, Fp8Config(skip=()))
    x = torch.randn(4, 32) * 3
    calibrate_(model, lambda: model[:3](x))  # the last layer is never reached
    first = model[0]
    assert first.activation == "static" and model[3].activation == "per-token"
    assert first.input_scale.item() == pytest.approx(x.abs().max().item() / 448, rel=1e-6)
    expected = ref.fp8_linear_ref(x, first.weight, first.weight_scale, first.bias, first.input_scale, True, False)
    assert torch.equal(first(x), expected)
    with pytest.raises(InputError, match="quantize_"):
        calibrate_(nn.Sequential(nn.Linear(4, 4)), lambda: None)


def test_quantize_skips_by_pattern_and_dequantize_restores_linears():
    model = nn.ModuleDict({"img_in": nn.Linear(8, 16), "block": nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))})
    quantize_(model)  # default config keeps embedders in high precision
    assert set(fp8_layers(model)) == {"block.0", "block.1"} and type(model["img_in"]) is nn.Linear
    x = torch.randn(3, 16)
    y = model["block"](x)
    dequantize_(model)
    assert not fp8_layers(model) and type(model["block"][0]) is nn.Linear
    torch.testing.assert_close(model["block"](x), y, rtol=0.1, atol=0.1)


def test_bad_configs_are_refused():
    with pytest.raises(InputError, match="per-row"):
        Fp8Config(weight="per-row")
    with pytest.raises(InputError, match="activation"):
        Fp8Config(activation="int8")
    with pytest.raises(InputError, match="skip groups"):
        skip_patterns("attention")
    with pytest.raises(InputError, match="tuple"):
        Fp8Config(skip="img_in")
    with pytest.raises(InputError, match="NaN"):
        Fp8Linear.from_linear(nn.Linear(4, 4).requires_grad_(False).apply(lambda m: m.weight.fill_(float("nan"))))


def test_op_inputs_are_checked():
    w, w_scale = _quantized()
    with pytest.raises(InputError, match="features"):
        ops.fp8_linear(torch.randn(2, 63), w, w_scale, None)
    with pytest.raises(InputError, match="w_scale"):
        ops.fp8_linear(torch.randn(2, 64), w, w_scale[:3], None)
    with pytest.raises(InputError, match="2-D"):
        ops.fp8_linear(torch.randn(2, 64), w.float(), w_scale, None)


def test_full_size_flux_dev_fp8_weights_are_about_half():
    from fastflow.models import Flux, from_name

    with torch.device("meta"):
        model = Flux(from_name("flux-dev")).to(torch.bfloat16)
    bf16 = weight_bytes(model)
    quantize_(model)
    ratio = weight_bytes(model) / bf16
    assert ratio <= 0.52, ratio
    assert all(m.weight.device.type == "meta" for m in fp8_layers(model).values())


def test_fp8_model_compiles_without_graph_breaks():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    quantize_(model, Fp8Config(skip=()))
    x = torch.randn(5, 32)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0
    # inductor's GELU between the layers rounds differently: an FP8 code may move by one step
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=0.05, atol=0.02)


def test_quantize_warns_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    import fastflow.quant as quant

    monkeypatch.setattr(quant, "fp8_runs_natively", lambda device: False)
    monkeypatch.setattr(quant, "device_name", lambda device: "NVIDIA A100 (sm_80)")
    with pytest.warns(UserWarning, match="A100.*dequantize on every call"):
        quantize_(nn.Sequential(nn.Linear(16, 16)), Fp8Config(skip=()))
