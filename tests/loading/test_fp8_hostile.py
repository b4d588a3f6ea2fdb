"""Hostile FP8 files (issue 31): NaN / inf codes, scales whose product with the largest code
overflows (in fp32 or the model dtype), denormal scales: each a typed error naming the tensor, in
every load mode (codes kept, dequantized, requantized)."""

import pytest
import torch
from safetensors.torch import save_file

import fastflow
from fastflow.errors import FastflowError, InvalidScaleError, NonFiniteWeightsError

from .test_fp8 import E4M3, E5M2, PREFIX, _scaled_fp8

MODES = ["keep", "none", "per-channel"]
KEY = "double_blocks.0.img_attn.qkv.weight"


def _load(path, mode="keep", dtype=torch.float32):
    quant = {"keep": None, "none": "none", "per-channel": "fp8"}[mode]
    return fastflow.load_transformer(path, variant="flux-tiny-dev", dtype=dtype, quant=quant)


def _with_code(tensor, code):
    codes = tensor.view(torch.uint8).clone()
    codes.view(-1)[3] = code
    return codes.view(tensor.dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_e4m3_nan_codes_are_refused_naming_the_tensor(tmp_path, bfl_state, mode, code):
    tensors = _scaled_fp8(bfl_state)
    key = PREFIX + "double_blocks.0.img_attn.qkv.weight"
    tensors[key] = _with_code(tensors[key], code)
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(NonFiniteWeightsError, match=r"img_attn\.qkv\.weight.*NaN or inf codes"):
        _load(path, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("code", [0x7C, 0xFC, 0x7E, 0xFF], ids=["inf", "-inf", "nan", "-nan"])
def test_e5m2_inf_and_nan_codes_are_refused(tmp_path, bfl_state, mode, code):
    tensors = {k: v.to(E5M2) for k, v in bfl_state.items()}
    tensors["img_in.weight"] = _with_code(tensors["img_in.weight"], code)
    path = tmp_path / "inf.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(NonFiniteWeightsError, match=r"img_in\.weight"):
        _load(path, mode)


@pytest.mark.parametrize("value,match", [(3e38, "overflows float32"), (1e-40, "denormal"), (1e-45, "denormal")])
def test_scales_that_overflow_or_are_denormal_are_refused(tmp_path, bfl_state, value, match):
    tensors = _scaled_fp8(bfl_state)
    tensors[PREFIX + "img_in.scale_weight"] = torch.tensor(value)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InvalidScaleError, match=rf"img_in\.scale_weight.*{match}"):
        _load(path)


@pytest.mark.parametrize("mode", MODES)
def test_a_scale_that_overflows_the_model_dtype_is_refused_in_that_dtype(tmp_path, bfl_state, mode):
    tensors = _scaled_fp8(bfl_state)
    tensors[PREFIX + "img_in.scale_weight"] = torch.tensor(1000.0)  # 448 x 1000 > fp16's 65504
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    _load(path, mode, torch.bfloat16)
    with pytest.raises(InvalidScaleError, match=r"img_in\.weight.*overflows float16"):
        _load(path, mode, torch.float16)


def test_fuzzed_fp8_files_are_typed_errors_or_finite_models(tmp_path, bfl_state):
    import random

    rng = random.Random(31)
    for i in range(24):
        tensors = _scaled_fp8(bfl_state)
        scales = sorted(k for k in tensors if k.endswith("scale_weight"))
        weights = sorted(k for k in tensors if tensors[k].dtype == E4M3 and tensors[k].numel())
        if rng.random() < 0.5:
            tensors[rng.choice(scales)] = torch.tensor(rng.choice([3e38, 1e-40, 1e38, 2.0, 0.0, float("nan")]))
        else:
            k = rng.choice(weights)
            tensors[k] = _with_code(tensors[k], rng.choice([0x7F, 0xFF, 0x7E, 0x00, 0x80]))
        path = tmp_path / f"fuzz{i}.safetensors"
        save_file(tensors, str(path))
        for mode in MODES:
            try:
                model = _load(path, mode)
            except FastflowError:
                continue
            for name, value in model.state_dict().items():
                assert torch.isfinite(value.float()).all(), (i, mode, name)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_quantizing_a_weight_with_nan_or_inf_names_it(tmp_path, bfl_state, value):
    """(fastflow quantize and quant="fp8" at load)"""
    tensors = dict(bfl_state)
    tensors[KEY] = tensors[KEY].clone()
    tensors[KEY][0, 0] = value
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(NonFiniteWeightsError, match=r"img_attn\.qkv\.weight.*NaN or Inf"):
        _load(path, "per-channel")
