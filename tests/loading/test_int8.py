"""int8 checkpoints (`fastflow quantize --format int8`): written and loaded back bit for bit,
quantizing at load equals quantize_ after load, dequantized with quant="none"; and every hostile
file is a typed error naming the tensor: non-finite / non-positive / denormal / overflowing scales,
scales of the wrong dtype or shape, int8 weights without a scale or with a static input scale, int8
tensors that are not weights, int8 tensors in a file that does not say it is fastflow's int8."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastflow
from fastflow.cli import main
from fastflow.errors import InputError, InvalidScaleError, UnsupportedDtypeError
from fastflow.loading import inspect_checkpoint
from fastflow.loading.writer import quantize_checkpoint
from fastflow.quant import Int8Config, Int8Linear, int8_layers, quantize_

from .test_fp8 import _same_state

KEY = "double_blocks.0.img_attn.qkv"


def _load(path, dtype=torch.float32, **kw):
    return fastflow.load_transformer(path, variant="flux-tiny-dev", dtype=dtype, **kw)


@pytest.fixture
def int8_file(tmp_path, bfl_file):
    out = tmp_path / "int8.safetensors"
    quantize_checkpoint(bfl_file, out, Int8Config(), dtype=torch.float32)
    return out


def _tampered(tmp_path, int8_file, change):
    tensors = load_file(str(int8_file))
    from safetensors import safe_open

    with safe_open(str(int8_file), "pt") as f:
        metadata = f.metadata()
    change(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_quantizing_at_load_equals_quantize_after_load(bfl_file):
    at_load = _load(bfl_file, quant="int8")
    after = quantize_(_load(bfl_file), Int8Config())
    _same_state(at_load, after)
    assert len(int8_layers(at_load)) > 20 and isinstance(at_load.get_submodule(KEY), Int8Linear)


def test_fastflow_quantize_int8_round_trips_bit_for_bit(tmp_path, bfl_file, int8_file, capsys):
    loaded = _load(int8_file)  # quant=None keeps the file's int8 layers
    _same_state(loaded, _load(bfl_file, quant="int8"))
    assert all(m.weight.t().is_contiguous() for m in int8_layers(loaded).values())
    raw = load_file(str(int8_file))
    assert raw[KEY + ".weight"].dtype == torch.int8 and raw[KEY + ".weight_scale"].shape == (
        raw[KEY + ".weight"].shape[0],
    )
    info = inspect_checkpoint(int8_file)
    assert info.quant.startswith("fastflow int8") and "quant:       fastflow int8" in info.summary()
    dequantized = _load(int8_file, quant="none")
    assert not int8_layers(dequantized)
    layer = loaded.get_submodule(KEY)
    assert torch.equal(dequantized.get_submodule(KEY).weight, layer.weight.float() * layer.weight_scale[:, None])
    out2 = tmp_path / "q2.safetensors"
    assert main(["quantize", str(bfl_file), str(out2), "--format", "int8", "--dtype", "float32"]) == 0
    assert "int8 layers" in capsys.readouterr().out
    _same_state(_load(out2), loaded)
    assert (
        main(
            ["quantize", str(bfl_file), str(tmp_path / "q3.safetensors"), "--format", "int8", "--weight", "per-tensor"]
        )
        == 2
    )
    assert "per-channel" in capsys.readouterr().err


def test_int8_file_is_half_the_bf16_size(tmp_path, bfl_file):
    out = tmp_path / "q.safetensors"
    quantize_checkpoint(bfl_file, out, Int8Config(skip=()), dtype=torch.bfloat16)
    bf16 = tmp_path / "bf16.safetensors"
    quantize_checkpoint(bfl_file, bf16, Int8Config(skip=("*",)), dtype=torch.bfloat16)  # nothing quantized
    assert out.stat().st_size < 0.6 * bf16.stat().st_size


@pytest.mark.parametrize(
    "value,match",
    [(math.nan, "nan"), (math.inf, "inf"), (0.0, "0.0"), (-0.5, "-0.5"), (1e-40, "denormal"), (3e38, "overflows")],
    ids=["nan", "inf", "zero", "negative", "denormal", "overflow"],
)
def test_bad_scale_values_are_refused(tmp_path, int8_file, value, match):
    def change(t):
        t[KEY + ".weight_scale"][5] = value

    with pytest.raises(InvalidScaleError, match=rf"qkv\.weight_scale.*{match}|qkv.*{match}"):
        _load(_tampered(tmp_path, int8_file, change))


def test_a_scale_that_overflows_the_model_dtype_is_refused_in_that_dtype(tmp_path, int8_file):
    def change(t):
        t[KEY + ".weight_scale"][0] = 1000.0  # 127 x 1000 > fp16's 65504

    path = _tampered(tmp_path, int8_file, change)
    _load(path, torch.bfloat16)
    with pytest.raises(InvalidScaleError, match=r"qkv\.weight.*overflows float16"):
        _load(path, torch.float16)


@pytest.mark.parametrize(
    "case,error,match",
    [
        ("scale int8", InvalidScaleError, "not fp32"),
        ("scale per-tensor", InvalidScaleError, r"needs one scale per output channel"),
        ("scale [N, 1]", InvalidScaleError, r"needs one scale per output channel"),
        ("scale too long", InvalidScaleError, r"needs one scale per output channel"),
        ("no scale", InvalidScaleError, "no per-channel weight_scale"),
        ("input scale", InvalidScaleError, "static input scale"),
        ("int8 bias", InvalidScaleError, r"qkv\.bias.*no per-channel weight_scale"),
        ("no metadata", UnsupportedDtypeError, "int8"),
        ("float weight", InvalidScaleError, "not FP8 or int8"),
    ],
)
def test_bad_int8_tensors_are_refused(tmp_path, int8_file, bfl_state, case, error, match):
    scale = KEY + ".weight_scale"

    def change(t):
        if case == "scale int8":
            t[scale] = torch.ones_like(t[scale], dtype=torch.int8)
        elif case == "scale per-tensor":
            t[scale] = t[scale][:1].clone()
        elif case == "scale [N, 1]":
            t[scale] = t[scale][:, None].clone()
        elif case == "scale too long":
            t[scale] = torch.cat((t[scale], t[scale][:1]))
        elif case == "no scale":
            del t[scale]
        elif case == "input scale":
            t[KEY + ".input_scale"] = torch.tensor([0.05])
        elif case == "int8 bias":
            t[KEY + ".bias"] = t[KEY + ".bias"].to(torch.int8)
        elif case == "float weight":
            t[KEY + ".weight"] = bfl_state[KEY + ".weight"]

    path = _tampered(tmp_path, int8_file, change)
    if case == "no metadata":
        save_file(load_file(str(int8_file)), str(path))  # int8 codes without fastflow's int8 marker
    with pytest.raises(error, match=match):
        _load(path)


@pytest.mark.parametrize("quant", ["int8", None])
def test_gpus_before_sm80(monkeypatch, bfl_file, int8_file, quant):
    """quant="int8" is refused there (typed, saying what to use); an int8 file loads dequantized
    with a warning, as an FP8 file does on a GPU without FP8 tensor cores (plan only: no CUDA here)."""
    import fastflow.loading.plan as plan
    import fastflow.ops.int8_gemm as gemm
    from fastflow.loading.describe import describe
    from fastflow.loading.source import open_checkpoint

    monkeypatch.setattr(plan, "int8_runs_natively", lambda device: False)
    monkeypatch.setattr(plan, "fp8_runs_natively", lambda device: False)
    monkeypatch.setattr(plan, "device_name", lambda device: "Tesla T4 (sm_75)")
    monkeypatch.setattr(gemm, "capability", lambda device: (7, 5))
    monkeypatch.setattr(gemm, "device_name", lambda device: "Tesla T4 (sm_75)")
    path = bfl_file if quant else int8_file
    with open_checkpoint(path) as source:
        description = describe(source, "transformer", variant="flux-tiny-dev")
        if quant:
            with pytest.raises(InputError, match=r"sm_80.*T4.*quant=None"):
                plan.make_plan(source, description, torch.bfloat16, "cuda", quant)
        else:
            with pytest.warns(UserWarning, match=r"T4.*no int8 tensor cores.*dequantized"):
                made = plan.make_plan(source, description, torch.bfloat16, "cuda", quant)
            assert not made.fp8_layers
