"""The CUDA C++ backend's op layer (fastflow/ops/cuda_cpp.py): on a CPU every call falls back to the
op's reference (so ``set_backend("cuda_cpp")`` is safe anywhere); on a GPU the csrc/ kernels are
compared with the reference and the Triton kernel (requires_cuda)."""

import pytest
import torch

import fastflow.ops as ops
from fastflow.ops import cuda_cpp
from fastflow.ops.reference import fp8_quantize_ref, groupnorm_silu_ref, qk_norm_rope_ref


def test_cpu_inputs_run_the_reference():
    x = torch.randn(2, 64, 6, 10).to(memory_format=torch.channels_last)
    w, b = torch.randn(64), torch.randn(64)
    with ops.use_backend("cuda_cpp"):
        torch.testing.assert_close(ops.groupnorm_silu(x, w, b, 8, 1e-6), groupnorm_silu_ref(x, w, b, 8, 1e-6),
                                   rtol=0, atol=0)  # fmt: skip
        q, s = ops.fp8_quantize(torch.randn(5, 32))
        qkv, scale, angles = torch.randn(1, 6, 3 * 2 * 64), torch.rand(64), torch.rand(6, 32)
        args = (qkv, scale, scale, torch.cos(angles), torch.sin(angles), 2, 1e-6)
        for mine, ref in zip(ops.qk_norm_rope(*args), qk_norm_rope_ref(*args), strict=True):
            assert torch.equal(mine, ref)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5,)
    assert not cuda_cpp.groupnorm_silu_supported(x, 8)  # not a CUDA tensor


def test_registered_as_a_kernel_backend_after_triton():
    assert ops.KERNEL_BACKENDS.index("triton") < ops.KERNEL_BACKENDS.index("cuda_cpp")
    for name in ("groupnorm_silu", "fp8_quantize", "qk_norm_rope"):
        assert ops.OPS[name].impls["cuda_cpp"].startswith("fastflow.ops.cuda_cpp:")


def test_which_gpus_the_build_serves():
    archs = "80;89;90a"
    served = {cap: cuda_cpp._serves(archs, cap) for cap in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (7, 5)]}
    # sm_86 runs the sm_80 cubin; sm_100 / sm_120 the compute_90 PTX; sm_75 needs NVRTC
    assert served == {(8, 0): True, (8, 6): True, (8, 9): True, (9, 0): True, (10, 0): True, (12, 0): True,
                      (7, 5): False}  # fmt: skip
    assert not cuda_cpp._serves("89;90a;100a", (8, 6))
    assert [cuda_cpp.nvrtc_arch(c) for c in [(8, 6), (9, 0), (10, 0), (12, 0)]] == ["86", "90a", "100a", "120"]


def test_nvrtc_kernels_refuse_bad_arguments_before_any_launch():
    k = cuda_cpp.NvrtcKernels("89", 0)
    assert k.groupnorm_silu_nhwc(2, 0, 0, 0, 0, 1, 64, 60, 8, 1, 1e-6, 0, 0) == -1  # 60 / 8 not a multiple of 8
    assert k.fp8_quantize_per_token(2, 0, 0, 0, 4, 12, 0) == -1
    assert k.qk_norm_rope(2, *[0] * 8, 1, 4, 2, 96, 1e-6, 0) == -1
    assert "does not take" in k.error_string(-1)
    assert k.groupnorm_silu_workspace_floats(2, 32, 5) == 2 * 32 * 17


def test_launch_parameters_are_what_cuda_python_packs():
    """The kernel parameters NvrtcKernels hands to cuda-python's cuLaunchKernel: values with their
    C types, in the form its parameter packer takes (checked by building that packer, no GPU)."""
    import ctypes

    from fastflow.ops import nvrtc

    try:
        from cuda.bindings import driver
    except ImportError:
        pytest.skip("cuda-python is not installed")
    params = nvrtc.kernel_params([("p", 0xDEAD0), ("i64", -7), ("f32", 0.5)])
    assert params == ((0xDEAD0, -7, 0.5), (ctypes.c_void_p, ctypes.c_longlong, ctypes.c_float))
    driver._HelperKernelParams(params)  # cuda-python's own packing of them
    with pytest.raises(TypeError):  # the packer checks: an address must be an integer
        driver._HelperKernelParams(((0.5,), (ctypes.c_void_p,)))
    with pytest.raises(ValueError, match="u32"):
        nvrtc.kernel_params([("u32", 1)])


def test_doctor_says_which_path_serves(monkeypatch):
    """fastflow doctor's line: the built module and the NVRTC fallback, NVRTC alone, or neither with
    what to install."""
    from fastflow.errors import InputError
    from fastflow.ops import nvrtc

    class Built:
        ARCHS = "80;89;90a"

        @staticmethod
        def runtime_version():
            return 13000

        @staticmethod
        def device_count():
            return 0

    def missing(*_):
        raise InputError("missing")

    monkeypatch.setattr(cuda_cpp, "module", lambda: Built)
    monkeypatch.setattr(nvrtc, "version", lambda: (13, 5))
    assert cuda_cpp.status() == (True, "fastflow._C built for sm 80;89;90a, CUDA runtime 13000, 0 GPU(s); "
                                       "NVRTC 13.5 for other GPUs")  # fmt: skip
    monkeypatch.setattr(cuda_cpp, "module", missing)
    usable, why = cuda_cpp.status()
    assert usable and "not built" in why and "NVRTC 13.5 compiles" in why
    monkeypatch.setattr(nvrtc, "version", missing)
    usable, why = cuda_cpp.status()
    assert not usable and "fastflow[cuda]" in why


def test_splits_fill_the_gpu_without_starving_threads():
    assert cuda_cpp.groupnorm_splits(1, 32, 1024 * 1024, 16, sms=132) == 17  # a 1024^2 VAE decode: split
    assert cuda_cpp.groupnorm_splits(16, 32, 64, 1, sms=132) == 1  # small: one block per group
    assert cuda_cpp.groupnorm_splits(1, 32, 16, 1, sms=132) == 1  # tiny spatial size


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 512, 128, 128), (2, 128, 33, 17), (1, 256, 1024, 64)])
def test_groupnorm_silu_on_gpu(shape, dtype):
    if not cuda_cpp.status()[0]:
        pytest.skip("fastflow._C is not built")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=g) * 2 + 0.3).to(dtype).to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
    b = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
    ours = cuda_cpp.groupnorm_silu(x, w, b, 32, 1e-6)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(ours.float(), groupnorm_silu_ref(x, w, b, 32, 1e-6).float(), rtol=tol, atol=tol)
    with ops.use_backend("triton"):
        torch.testing.assert_close(ours.float(), ops.groupnorm_silu(x, w, b, 32, 1e-6).float(), rtol=tol, atol=tol)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_quantize_on_gpu(dtype):
    if not cuda_cpp.status()[0]:
        pytest.skip("fastflow._C is not built")
    x = (torch.randn(4096, 3072, device="cuda") * 3).to(dtype)
    q, s = cuda_cpp.fp8_quantize(x)
    ref_q, ref_s = fp8_quantize_ref(x)
    assert torch.equal(s, ref_s) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,d,tokens", [(24, 128, 4608), (2, 64, 77), (3, 256, 5)])
def test_qk_norm_rope_on_gpu(heads, d, tokens, dtype):
    if not cuda_cpp.status()[0]:
        pytest.skip("fastflow._C is not built")
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = (torch.randn(2, tokens, 3 * heads * d, device="cuda", generator=g) * 3).to(dtype)
    qs, ks = (torch.rand(d, device="cuda", generator=g) + 0.5 for _ in range(2))
    angles = torch.rand(tokens, d // 2, device="cuda", generator=g) * 100
    args = (qkv, qs.to(dtype), ks.to(dtype), torch.cos(angles), torch.sin(angles), heads, 1e-6)
    ours = cuda_cpp.qk_norm_rope(*args)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for mine, ref in zip(ours, qk_norm_rope_ref(*args), strict=True):
        torch.testing.assert_close(mine.float(), ref.float(), rtol=tol, atol=tol)
    with ops.use_backend("triton"):
        for mine, tri in zip(ours, ops.qk_norm_rope(*args), strict=True):
            torch.testing.assert_close(mine.float(), tri.float(), rtol=tol, atol=tol)


@pytest.mark.requires_cuda
def test_nvrtc_path_on_gpu(monkeypatch):
    """The run-time compiled kernels (as on a GPU the build does not serve) give the same results."""
    from fastflow.ops import nvrtc

    try:
        nvrtc.library()
    except Exception:
        pytest.skip("NVRTC is not installed")
    cap = torch.cuda.get_device_capability()
    index = torch.cuda.current_device()
    monkeypatch.setitem(cuda_cpp._KERNELS, index, cuda_cpp.NvrtcKernels(cuda_cpp.nvrtc_arch(cap), index))
    x = torch.randn(1, 256, 40, 24, device="cuda").bfloat16().to(memory_format=torch.channels_last)
    w, b = torch.randn(256, device="cuda").bfloat16(), torch.randn(256, device="cuda").bfloat16()
    torch.testing.assert_close(cuda_cpp.groupnorm_silu(x, w, b, 32, 1e-6).float(),
                               groupnorm_silu_ref(x, w, b, 32, 1e-6).float(), rtol=1.6e-2, atol=1.6e-2)  # fmt: skip
    a = torch.randn(64, 512, device="cuda").bfloat16()
    q, s = cuda_cpp.fp8_quantize(a)
    ref_q, ref_s = fp8_quantize_ref(a)
    assert torch.equal(s, ref_s) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    qkv, scale = torch.randn(1, 9, 3 * 2 * 128, device="cuda"), torch.rand(128, device="cuda") + 0.5
    angles = torch.rand(9, 64, device="cuda")
    args = (qkv, scale, scale, torch.cos(angles), torch.sin(angles), 2, 1e-6)
    for mine, ref in zip(cuda_cpp.qk_norm_rope(*args), qk_norm_rope_ref(*args), strict=True):
        torch.testing.assert_close(mine, ref, rtol=2e-5, atol=2e-5)
