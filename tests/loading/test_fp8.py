"""FP8 checkpoints: plain, scaled (ComfyUI scale_weight / scale_input) and fastflow's own files load
as FP8 layers holding the file's codes, or dequantized; quantizing at load equals quantize_ after
load; `fastflow quantize` round-trips bit for bit; every bad scale is a typed error."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastflow
from fastflow.cli import main
from fastflow.errors import InputError, InvalidScaleError, UnexpectedKeysError
from fastflow.loading import inspect_checkpoint
from fastflow.loading.writer import quantize_checkpoint
from fastflow.quant import Fp8Config, Fp8Linear, fp8_layers, quantize_, skip_patterns

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
PREFIX = "model.diffusion_model."


def _load(path, **kw):
    return fastflow.load_transformer(path, variant="flux-tiny-dev", dtype=torch.float32, **kw)


def _bits(t):
    return t.view(torch.uint8) if t.dtype in (E4M3, E5M2) else t


def _same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])), k


def _linear_weights(state):
    return [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]


def _scaled_fp8(state, static_layer="final_layer.linear"):
    """A ComfyUI-style scaled FP8 single file: e4m3 linear weights, one fp32 scale_weight each."""
    out = {}
    for k, v in state.items():
        out[PREFIX + k] = v
        if k in _linear_weights(state):
            scale = v.abs().max() / 448
            out[PREFIX + k] = (v / scale).to(E4M3)
            out[PREFIX + k[: -len("weight")] + "scale_weight"] = scale.reshape(())
    out[PREFIX + static_layer + ".scale_input"] = torch.tensor(0.05)
    out[PREFIX + "scaled_fp8"] = torch.empty(0, dtype=E4M3)
    return out


@pytest.fixture
def scaled_file(tmp_path, bfl_state):
    path = tmp_path / "flux-tiny-fp8-scaled.safetensors"
    save_file(_scaled_fp8(bfl_state), str(path))
    return path


def test_quantizing_at_load_equals_quantize_after_load(bfl_file, sharded_dev):
    for path in (bfl_file, sharded_dev):
        _same_state(_load(path, quant="fp8"), quantize_(_load(path)))
    config = Fp8Config(weight="per-tensor", skip=skip_patterns("embedders"))
    _same_state(_load(bfl_file, quant=config), quantize_(_load(bfl_file), config))


def test_scaled_fp8_file_keeps_its_codes_scales_and_static_input_scale(scaled_file):
    raw = load_file(str(scaled_file))
    model = _load(scaled_file)
    layers = fp8_layers(model)
    assert len(layers) == len([k for k in raw if k.endswith(".scale_weight")])
    for name, layer in layers.items():
        assert torch.equal(layer.weight.view(torch.uint8), raw[PREFIX + name + ".weight"].view(torch.uint8))
        assert layer.weight_granularity == "per-tensor"
        assert layer.weight_scale.item() == raw[PREFIX + name + ".scale_weight"].item()
    final = layers["final_layer.linear"]
    assert final.activation == "static" and final.input_scale.item() == pytest.approx(0.05)
    assert layers["img_in"].activation == "per-token"
    # dequantized instead: codes x scale, in the model dtype
    plain = _load(scaled_file, quant="none")
    assert not fp8_layers(plain)
    w = raw[PREFIX + "img_in.weight"].float() * raw[PREFIX + "img_in.scale_weight"]
    assert torch.equal(plain.img_in.weight, w)


def test_a_per_tensor_scale_serves_per_channel_layers_exactly(scaled_file):
    raw = load_file(str(scaled_file))
    layer = fp8_layers(_load(scaled_file, quant=Fp8Config(skip=())))["img_in"]
    assert layer.weight_granularity == "per-channel" and layer.weight_scale.shape == (layer.out_features,)
    assert torch.equal(layer.weight.view(torch.uint8), raw[PREFIX + "img_in.weight"].view(torch.uint8))


def test_unscaled_fp8_files_in_e4m3_and_e5m2(tmp_path, bfl_state):
    for dtype in (E4M3, E5M2):
        path = tmp_path / f"plain-{dtype}.safetensors"
        save_file({k: v.to(dtype) for k, v in bfl_state.items()}, str(path))  # biases and norms too
        model = _load(path)
        layers = fp8_layers(model)
        assert set(layers) == {k[: -len(".weight")] for k in _linear_weights(bfl_state)}
        for name, layer in layers.items():
            file_values = bfl_state[name + ".weight"].to(dtype).float()
            got = layer.weight.float() * layer.weight_scale.reshape(-1, 1)
            if dtype == E4M3:  # the codes themselves, scale 1
                assert torch.equal(got, file_values), name
            else:  # e5m2 requantized to e4m3: within e4m3's rounding
                assert ((got - file_values).abs() <= file_values.abs() / 16 + 1e-6).all(), name
        assert model.img_in.bias.dtype == torch.float32
        assert torch.equal(model.img_in.bias, bfl_state["img_in.bias"].to(dtype).float())


def test_fastflow_quantize_round_trips_bit_for_bit(tmp_path, bfl_file, capsys):
    out = tmp_path / "q.safetensors"
    done = quantize_checkpoint(bfl_file, out, dtype=torch.float32)
    assert done["fp8_layers"] > 20
    _same_state(_load(out), _load(bfl_file, quant="fp8"))
    info = inspect_checkpoint(out)
    assert info.quant.startswith("fastflow fp8-e4m3 (per-channel scales)") and "F8_E4M3" in info.quant
    assert inspect_checkpoint(bfl_file).quant is None
    assert "quant:       fastflow fp8-e4m3" in info.summary()
    # the CLI: writes a second copy, refuses to overwrite
    out2 = tmp_path / "q2.safetensors"
    assert main(["quantize", str(bfl_file), str(out2), "--variant", "flux-tiny-dev", "--dtype", "float32"]) == 0
    assert "FP8 layers" in capsys.readouterr().out
    _same_state(_load(out2), _load(out))
    assert main(["quantize", str(bfl_file), str(out2)]) == 2
    assert "never overwrites" in capsys.readouterr().err


def test_fp8_file_is_half_the_size(tmp_path, bfl_file):
    out = tmp_path / "q.safetensors"
    quantize_checkpoint(bfl_file, out, Fp8Config(skip=()), dtype=torch.bfloat16)
    bf16 = tmp_path / "bf16.safetensors"
    quantize_checkpoint(bfl_file, bf16, Fp8Config(skip=("*",)), dtype=torch.bfloat16)  # nothing quantized
    assert out.stat().st_size < 0.6 * bf16.stat().st_size


@pytest.mark.parametrize(
    "value,match",
    [(math.nan, "nan"), (math.inf, "inf"), (0.0, "0.0"), (-0.5, "-0.5")],
    ids=["nan", "inf", "zero", "negative"],
)
def test_bad_scale_values_are_refused(tmp_path, bfl_state, value, match):
    tensors = _scaled_fp8(bfl_state)
    tensors[PREFIX + "img_in.scale_weight"] = torch.tensor(value)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InvalidScaleError, match=match):
        _load(path)


@pytest.mark.parametrize("case", ["shape", "dtype", "float weight", "input shape"])
def test_bad_scale_tensors_are_refused(tmp_path, bfl_state, case):
    tensors = _scaled_fp8(bfl_state)
    key = PREFIX + "img_in.scale_weight"
    if case == "shape":
        tensors[key] = torch.ones(3)
    elif case == "dtype":
        tensors[key] = torch.ones((), dtype=torch.int32)
    elif case == "float weight":
        tensors[PREFIX + "img_in.weight"] = bfl_state["img_in.weight"]
    else:
        tensors[PREFIX + "img_in.scale_input"] = torch.ones(4)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InvalidScaleError, match="img_in"):
        _load(path)


def test_a_scale_of_no_layer_is_unexpected(tmp_path, bfl_state):
    tensors = _scaled_fp8(bfl_state)
    tensors[PREFIX + "no_such_layer.scale_weight"] = torch.tensor(1.0)
    path = tmp_path / "stray.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UnexpectedKeysError, match="no_such_layer"):
        _load(path)


def test_static_activations_need_scales(bfl_file):
    with pytest.raises(InputError, match="calibrate_"):
        _load(bfl_file, quant=Fp8Config(activation="static"))
    with pytest.raises(InputError, match="quant="):
        _load(bfl_file, quant="int4")


def test_gpus_without_fp8_tensor_cores_get_dequantized_weights(monkeypatch, scaled_file):
    import fastflow.loading.plan as plan

    monkeypatch.setattr(plan, "fp8_runs_natively", lambda device: False)
    monkeypatch.setattr(plan, "device_name", lambda device: "NVIDIA A100-SXM4-80GB (sm_80)")
    with pytest.warns(UserWarning, match="A100.*no FP8 tensor cores"):
        model = _load(scaled_file)
    assert not fp8_layers(model) and not any(isinstance(m, Fp8Linear) for m in model.modules())
