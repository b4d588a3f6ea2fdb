"""The CPU's default dtype: bfloat16 where the CPU has native bf16 dot products, float32 elsewhere,
and float32 for a model whose folder keeps it (the embedded digits model). The suite pins the
capability to "none" (conftest.float32_cpu_default); these tests set it each way."""

import json
import shutil

import pytest
import torch

import fastflow
from fastflow.cli import doctor
from fastflow.cli.common import device_and_dtype
from fastflow.errors import InputError
from fastflow.loading import DEFAULT_MODEL
from fastflow.ops import capability

from .conftest import tiny_pipeline_folder


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(capability, "cpu_bf16", lambda: "AVX512-BF16")


@pytest.fixture
def plain_cpu(monkeypatch):
    monkeypatch.setattr(capability, "cpu_bf16", lambda: None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_pipeline_folder(tmp_path_factory.mktemp("cpu_dtype") / "flux", "flux-tiny-dev")


def _dtypes(pipe) -> set:
    modules = [pipe.transformer, pipe.vae, pipe.text_encoder.clip_l.model, pipe.text_encoder.t5.model]
    return {next(m.parameters()).dtype for m in modules}


@pytest.mark.parametrize(
    ("machine", "flags", "expected"),
    [
        ("x86_64", {"avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}, "AMX-BF16"),
        ("x86_64", {"avx512f", "avx512_bf16"}, "AVX512-BF16"),
        ("AMD64", {"avx2", "avx512f"}, None),
        ("aarch64", {"bf16", "avx512_bf16"}, None),  # not measured faster there: float32
    ],
)
def test_detection_reads_the_cpu_flags(monkeypatch, machine, flags, expected):
    monkeypatch.setattr(capability.platform, "machine", lambda: machine)
    monkeypatch.setattr(capability, "_cpuinfo_flags", lambda: flags)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert capability.detect_cpu_bf16() == expected


def test_detection_falls_back_to_torch_where_there_is_no_cpuinfo(monkeypatch):
    monkeypatch.setattr(capability.platform, "machine", lambda: "AMD64")
    monkeypatch.setattr(capability, "_cpuinfo_flags", set)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert capability.detect_cpu_bf16() == "AVX512-BF16"


def test_bf16_cpu_loads_in_bfloat16(bf16_cpu, folder):
    assert capability.cpu_default_dtype() == torch.bfloat16
    pipe = fastflow.load(folder, device="cpu")
    assert _dtypes(pipe) == {torch.bfloat16}  # the transformer, the VAE and both text encoders, as on a GPU


def test_cpu_without_bf16_loads_in_float32(plain_cpu, folder):
    assert capability.cpu_default_dtype() == torch.float32
    assert _dtypes(fastflow.load(folder, device="cpu")) == {torch.float32}


def test_dtype_given_wins_over_the_rule(plain_cpu, folder):
    assert _dtypes(fastflow.load(folder, device="cpu", dtype="bf16")) == {torch.bfloat16}


def test_folder_that_keeps_float32_is_honoured(bf16_cpu, folder, tmp_path):
    kept = shutil.copytree(folder, tmp_path / "kept")
    index = json.loads((kept / "model_index.json").read_text())
    (kept / "model_index.json").write_text(json.dumps({**index, "_fastflow_cpu_dtype": "float32"}))
    assert _dtypes(fastflow.load(kept, device="cpu")) == {torch.float32}
    assert _dtypes(fastflow.load(kept, device="cpu", dtype=torch.bfloat16)) == {torch.bfloat16}


def test_folder_with_a_bad_cpu_dtype_is_refused(bf16_cpu, folder, tmp_path):
    bad = shutil.copytree(folder, tmp_path / "bad")
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "_fastflow_cpu_dtype": "fp4"}))
    with pytest.raises(InputError, match="_fastflow_cpu_dtype 'fp4'.*pass dtype="):
        fastflow.load(bad, device="cpu")


def test_embedded_model_keeps_float32_by_its_config(bf16_cpu):
    """bench/quality.py: FD-digits 0.079 in bf16 against 0.077 in fp32 (within 10%), but the tiny
    model's GEMMs are too small for bf16 to pay: a warm image takes 1.46x longer (1 thread)."""
    index = json.loads((DEFAULT_MODEL / "model_index.json").read_text())
    assert index["_fastflow_cpu_dtype"] == "float32"
    assert fastflow.load(DEFAULT_MODEL, device="cpu", text_encoders=False).transformer.dtype == torch.float32


def test_cli_leaves_the_default_to_load(bf16_cpu):
    assert device_and_dtype("cpu") == ("cpu", None)
    assert device_and_dtype("cpu", "float32") == ("cpu", torch.float32)


def test_doctor_reports_the_cpu(monkeypatch):
    monkeypatch.setattr(capability, "cpu_bf16", lambda: "AMX-BF16")
    lines = doctor.cpu_section()
    assert "native bf16 dot products (AMX-BF16)" in lines[0] and "CPU default dtype: bfloat16" in lines[1]
    monkeypatch.setattr(capability, "cpu_bf16", lambda: None)
    lines = doctor.cpu_section()
    assert "no native bf16" in lines[0] and "CPU default dtype: float32" in lines[1]
