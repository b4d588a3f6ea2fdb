"""The CUDA C++ backend's runtime rules, with fakes in place of a GPU and a driver: launches run on
the tensors' device (device guard, primary context per device, NVRTC modules keyed by device), the
driver is checked at first use (too old: NVRTC of its major, else Triton / the reference, one
warning, reported by ``fastflow doctor``), and qk_norm_rope takes None scales and tables."""

import warnings

import pytest
import torch

from fastflow.errors import InputError
from fastflow.ops import cuda_cpp, cuda_driver, nvrtc
from fastflow.ops.reference import qk_norm_rope_ref


class FakeDriver:
    """cuda-python's driver module as nvrtc uses it, recording which context is current when a
    module is loaded, a function looked up and a kernel launched."""

    class CUresult:
        CUDA_SUCCESS = 0

    def __init__(self):
        self.stack, self.events = [], []

    @staticmethod
    def CUstream(handle):
        return handle

    def cuDeviceGet(self, index):
        return 0, f"dev{index}"

    def cuDevicePrimaryCtxRetain(self, device):
        self.events.append(("retain", device))
        return 0, f"ctx-{device}"

    def cuCtxPushCurrent(self, context):
        self.stack.append(context)
        return (0,)

    def cuCtxPopCurrent(self):
        return 0, self.stack.pop()

    def _current(self):
        return self.stack[-1] if self.stack else None

    def cuModuleLoadData(self, image):
        self.events.append(("load", self._current()))
        return 0, f"module@{self._current()}"

    def cuModuleGetFunction(self, module, name):
        return 0, (module, name.decode())

    def cuLaunchKernel(self, fn, *rest):
        self.events.append(("launch", self._current(), fn[0]))
        return (0,)


@pytest.fixture
def fake_driver(monkeypatch):
    cu = FakeDriver()
    monkeypatch.setattr(nvrtc, "driver", lambda: cu)
    monkeypatch.setattr(nvrtc, "cubin", lambda unit, arch: b"\x7fELF cubin")
    monkeypatch.setattr(nvrtc, "_MODULES", {})
    monkeypatch.setattr(nvrtc, "_PRIMARY", {}, raising=False)
    return cu


def test_nvrtc_loads_and_launches_in_the_devices_primary_context(fake_driver):
    args = [("p", 16), ("i64", 4)]
    assert nvrtc.launch("fp8_quantize", "90a", 1, "ff_fp8_quantize_per_token_bf16", 4, 256, args, 0) == 0
    assert nvrtc.launch("fp8_quantize", "90a", 1, "ff_fp8_quantize_per_token_bf16", 4, 256, args, 0) == 0
    assert nvrtc.launch("fp8_quantize", "90a", 0, "ff_fp8_quantize_per_token_bf16", 4, 256, args, 0) == 0
    loads = [e for e in fake_driver.events if e[0] == "load"]
    launches = [e for e in fake_driver.events if e[0] == "launch"]
    assert loads == [("load", "ctx-dev1"), ("load", "ctx-dev0")]  # one module per device, in its context
    # each launch in its device's context, with the function of the module loaded there
    assert launches == [("launch", "ctx-dev1", "module@ctx-dev1")] * 2 + [("launch", "ctx-dev0", "module@ctx-dev0")]
    assert fake_driver.stack == []  # the caller's context is current again


class FakeCudaTensor:
    """Just enough of a CUDA tensor on ``cuda:<index>`` for the op layer's checks and launch."""

    is_cuda = True

    def __init__(self, shape, index, dtype=torch.bfloat16, address=4096):
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device("cuda", index)
        self.address = address

    def is_contiguous(self, memory_format=None):
        return True

    def data_ptr(self):
        return self.address

    def element_size(self):
        return 2

    def numel(self):
        return int(torch.tensor(self.shape).prod())

    def dim(self):
        return len(self.shape)

    def new_empty(self, *shape):
        return FakeCudaTensor(shape, self.device.index, self.dtype, self.address + 4096)


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two fake sm_90 GPUs: records the device made current around each launch."""
    current, seen = [0], []

    class Guard:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.before, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.before

    def launch(unit, arch, device, name, grid, block, args, stream):
        seen.append({"device": device, "current": current[0], "unit": unit, "name": name, "args": args})
        return 0

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(cuda_cpp, "_stream", lambda device: 7)
    monkeypatch.setattr(cuda_cpp, "_KERNELS", {})
    monkeypatch.setattr(nvrtc, "launch", launch)
    return seen


def test_a_launch_on_cuda1_runs_on_device_1(fake_gpus, monkeypatch):
    """NVRTC's kernels for a tensor on cuda:1 (the build does not serve it here): device 1 is
    current for the launch, and the kernels are those compiled and loaded for device 1."""
    monkeypatch.setattr(cuda_cpp, "choice", lambda index: ("nvrtc", ""), raising=False)
    qkv = FakeCudaTensor((1, 4, 3 * 2 * 64), index=1)
    cuda_cpp.qk_norm_rope(qkv, None, None, None, None, 2)
    (launch,) = fake_gpus
    assert (launch["device"], launch["current"], launch["unit"]) == (1, 1, "qk_norm_rope")
    assert isinstance(cuda_cpp._KERNELS[1], cuda_cpp.NvrtcKernels) and cuda_cpp._KERNELS[1].device == 1
    assert 0 not in cuda_cpp._KERNELS  # nothing was set up for the current device 0


def test_qk_norm_rope_passes_none_scales_and_tables_as_null(fake_gpus, monkeypatch):
    monkeypatch.setattr(cuda_cpp, "choice", lambda index: ("nvrtc", ""), raising=False)
    qkv = FakeCudaTensor((2, 4, 3 * 2 * 128), index=0)
    q, k, v = cuda_cpp.qk_norm_rope(qkv, None, None, None, None, 2)
    assert q.shape == (2, 2, 4, 128)
    pointers = [value for kind, value in fake_gpus[0]["args"] if kind == "p"]
    assert pointers[4:] == [0, 0, 0, 0]  # q_scale, k_scale, cos, sin: null (no norm, no RoPE)


def test_qk_norm_rope_refuses_one_rope_table_before_launch(fake_gpus, monkeypatch):
    monkeypatch.setattr(cuda_cpp, "choice", lambda index: ("nvrtc", ""), raising=False)
    with pytest.raises(InputError, match="cos and sin"):
        cuda_cpp.qk_norm_rope(FakeCudaTensor((1, 4, 3 * 2 * 64), index=0), None, None, None, torch.ones(4, 32), 2)
    with pytest.raises(InputError, match="cos and sin"):
        cuda_cpp.qk_norm_rope(torch.randn(1, 4, 3 * 2 * 64), None, None, torch.ones(4, 32), None, 2)
    assert fake_gpus == []


# -- the driver check ------------------------------------------------------------------------------
class Built:
    ARCHS = "80;89;90a"

    def __init__(self, runtime):
        self.runtime = runtime

    def runtime_version(self):
        return self.runtime


def _machine(monkeypatch, driver, runtime, nvrtc_version, cap=(9, 0)):
    built = Built(runtime)
    monkeypatch.setattr(cuda_driver, "driver_version", lambda: driver)
    monkeypatch.setattr(cuda_cpp, "module", lambda: built)
    monkeypatch.setattr(cuda_cpp, "_nvrtc_version", lambda: nvrtc_version, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
    monkeypatch.setattr(cuda_cpp, "_KERNELS", {})
    monkeypatch.setattr(cuda_cpp, "_warned", [], raising=False)
    return built


def test_the_driver_picks_the_build_or_nvrtc_of_its_major_with_one_warning(monkeypatch):
    _machine(monkeypatch, driver=12020, runtime=13000, nvrtc_version=(12, 8))
    with pytest.warns(UserWarning, match="CUDA 13.0 runtime.*CUDA 12.2.*NVRTC 12.8") as caught:
        first = cuda_cpp.kernels(torch.device("cuda", 0))
        second = cuda_cpp.kernels(torch.device("cuda", 1))
        cuda_cpp.kernels(torch.device("cuda", 0))
    assert len(caught) == 1
    assert isinstance(first, cuda_cpp.NvrtcKernels) and (first.arch, first.device) == ("90a", 0)
    assert second.device == 1
    # a driver new enough for the build's runtime: fastflow._C, without a warning
    built = _machine(monkeypatch, driver=13000, runtime=13000, nvrtc_version=(13, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda_cpp.kernels(torch.device("cuda", 0)) is built
    built = _machine(monkeypatch, driver=12020, runtime=12080, nvrtc_version=None)  # minor version compatibility
    assert cuda_cpp.kernels(torch.device("cuda", 0)) is built


def test_a_driver_too_old_for_both_falls_back_to_triton_or_the_reference(monkeypatch):
    _machine(monkeypatch, driver=12020, runtime=13000, nvrtc_version=(13, 0))
    with pytest.warns(UserWarning, match="Triton") as caught:
        assert cuda_cpp.kernels(torch.device("cuda", 0)) is None
        assert cuda_cpp.kernels(torch.device("cuda", 0)) is None
    assert len(caught) == 1 and "cuda12" in str(caught[0].message)
    # an sm_100 GPU has only the build's PTX, which a driver older than the runtime cannot compile
    _machine(monkeypatch, driver=12020, runtime=12080, nvrtc_version=None, cap=(10, 0))
    with pytest.warns(UserWarning, match="CUDA 12.8 or newer"):
        assert cuda_cpp.kernels(torch.device("cuda", 0)) is None


def test_without_the_cuda_cpp_kernels_an_op_runs_its_triton_kernel_or_reference(fake_gpus, monkeypatch):
    from fastflow.ops import _registry

    monkeypatch.setattr(cuda_cpp, "choice", lambda index: ("fallback", "too old"), raising=False)
    monkeypatch.setattr(cuda_cpp, "_warned", ["given"], raising=False)
    calls = []
    monkeypatch.setattr(cuda_cpp, "_fallback", lambda name, args: calls.append(name) or "fallback")
    assert cuda_cpp.qk_norm_rope(FakeCudaTensor((1, 4, 3 * 2 * 64), index=1), None, None, None, None, 2) == "fallback"
    assert calls == ["qk_norm_rope"] and fake_gpus == []  # nothing launched
    monkeypatch.undo()
    monkeypatch.setattr(_registry, "_available", lambda backend: False)  # no Triton: the reference
    qkv = torch.randn(1, 3, 3 * 2 * 64)
    out = cuda_cpp._fallback("qk_norm_rope", (qkv, None, None, None, None, 2, 1e-6))
    for mine, ref in zip(out, qk_norm_rope_ref(qkv, None, None, None, None, 2, 1e-6), strict=True):
        assert torch.equal(mine, ref)


def test_doctor_reports_the_driver(monkeypatch):
    from fastflow.cli import doctor

    _machine(monkeypatch, driver=12020, runtime=13000, nvrtc_version=None)
    lines = doctor.cuda_driver_section(gpu=False)
    assert lines[0] == "CUDA driver: supports CUDA 12.2 (cuDriverGetVersion 12020)"
    assert "CUDA 13.0 runtime, needs a driver for CUDA 13.0 or newer" in lines[1]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    lines = doctor.cuda_driver_section(gpu=True)
    assert lines[-1].startswith("  cuda:0 CUDA C++ ops run Triton kernels / references (fastflow._C is built")
    monkeypatch.setattr(cuda_driver, "driver_version", lambda: None)
    assert "none found" in doctor.cuda_driver_section(gpu=False)[0]


def test_driver_rules():
    assert cuda_driver.runs(12080, 12020) and not cuda_driver.runs(12080, 12020, jit=True)
    assert not cuda_driver.runs(13000, 12080) and cuda_driver.runs(13000, 13020) and cuda_driver.runs(13000, None)
    assert cuda_driver.choose(12020, None, None, (12, 4)) == ("nvrtc", "")  # not built: NVRTC, nothing to warn
    assert cuda_driver.choose(12020, (13000, "80"), None, None) == ("fallback", "")  # neither installed: caller
