"""NVRTC compiles every csrc/ kernel unit to a cubin for sm_80 / sm_89 / sm_90a without a GPU (the
run-time path for GPUs the built module lacks), and the disk cache serves the second request."""

import pytest

from fastflow.errors import InputError
from fastflow.ops import nvrtc

try:
    nvrtc.library()
except InputError:
    pytest.skip(f"NVRTC is not installed ({nvrtc.INSTALL})", allow_module_level=True)

KERNELS = {
    "groupnorm_silu": [f"ff_groupnorm_{k}_{t}" for k in ("stats", "apply") for t in ("f32", "f16", "bf16")]
    + ["ff_groupnorm_finalize"],
    "fp8_quantize": [f"ff_fp8_quantize_per_token_{t}" for t in ("f32", "f16", "bf16")],
    "qk_norm_rope": [f"ff_qk_norm_rope_{t}_d{e}" for t in ("f32", "f16", "bf16") for e in (2, 4, 8)],
}


@pytest.mark.parametrize("arch", ["80", "89", "90a"])
@pytest.mark.parametrize("unit", list(nvrtc.UNITS))
def test_every_unit_compiles(unit, arch):
    cubin = nvrtc.compile_unit(unit, arch)
    assert cubin[:4] == b"\x7fELF"
    # NVRTC wrote its (empty) log and the cubin into our buffers, not into shared bytes objects: a
    # 1-byte bytes buffer is CPython's cached b" ", which once became NUL for the whole test run
    assert ord(b" ") == 32 and ord(b"\x00") == 0
    missing = [k for k in KERNELS[unit] if k.encode() not in cubin]
    assert not missing


def test_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFLOW_CACHE_DIR", str(tmp_path))
    calls = []
    real = nvrtc.compile_unit
    monkeypatch.setattr(nvrtc, "compile_unit", lambda u, a: calls.append((u, a)) or real(u, a))
    first = nvrtc.cubin("groupnorm_silu", "89")
    again = nvrtc.cubin("groupnorm_silu", "89")
    assert first == again and calls == [("groupnorm_silu", "89")]
    (entry,) = (tmp_path / "cubin").iterdir()
    assert entry.name.startswith("groupnorm_silu-sm_89-")


def test_a_compile_error_carries_the_log(monkeypatch):
    monkeypatch.setattr(nvrtc, "sources", lambda: {"groupnorm_silu.cuh": "this is not C++;"})
    with pytest.raises(RuntimeError, match="groupnorm_silu.cuh"):
        nvrtc.compile_unit("groupnorm_silu", "80")


def test_a_cache_that_cannot_be_written_warns_once_and_still_compiles(tmp_path, monkeypatch):
    import warnings

    from fastflow.ops import cache_root

    monkeypatch.setenv("FASTFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache_root, "_warned", set())
    monkeypatch.setattr(nvrtc, "compile_unit", lambda u, a: b"\x7fELF" + u.encode())

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_root, "write_entry", full)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = [nvrtc.cubin(unit, "89") for unit in ("groupnorm_silu", "fp8_quantize", "qk_norm_rope")]
    assert got == [b"\x7fELF" + u.encode() for u in ("groupnorm_silu", "fp8_quantize", "qk_norm_rope")]
    assert [str(w.message) for w in seen if "cubin cache" in str(w.message)] == [
        f"could not write the cubin cache in {tmp_path / 'cubin'} (No space left on device): compiling uncached"
    ]
