"""The CUDA C++ kernels' math on the CPU: csrc/'s __host__ __device__ helpers (rounding to bf16 /
fp16 / e4m3, decoding, Welford statistics, the normalise + SiLU step) compiled for the host by g++
and, where the machine has it, by nvcc as CUDA, and compared with torch bit for bit (conversions)
or to fp32 rounding (statistics)."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).with_name("host_helpers.cpp")
COMPILERS = [c for c in ("g++", "nvcc") if shutil.which(c)]


@pytest.fixture(scope="module", params=COMPILERS)
def lib(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "host_helpers.so"
    if request.param == "nvcc":  # FF_HD = __host__ __device__: the kernels' own build of the helpers
        cmd = ["nvcc", "-x", "cu", "-shared", "-Xcompiler", "-fPIC", "-O2", "-std=c++17"]
    else:
        cmd = ["g++", "-x", "c++", "-shared", "-fPIC", "-O2", "-std=c++17", "-ffp-contract=off"]
    done = subprocess.run([*cmd, f"-I{ROOT / 'csrc'}", str(SOURCE), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return ctypes.CDLL(str(out))


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def _call(lib, name, x: np.ndarray, out_dtype, *extra):
    out = np.empty(x.shape, dtype=out_dtype)
    getattr(lib, name)(_ptr(x), _ptr(out), ctypes.c_longlong(x.size), *extra)
    return out


def _samples() -> np.ndarray:
    """Normal values over many scales, the rounding midpoints of bf16 / fp16, subnormals, infinities, NaN."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(20000, generator=g) * 10.0 ** torch.randint(-9, 6, (20000,), generator=g).float()]
    bits = torch.randint(0, 2**31 - 1, (20000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    parts.append(bits[torch.isfinite(bits)])
    mid = torch.arange(-300, 300).float() * 2**-7 + 1.0  # 1 + k 2^-7: bf16 ties at odd k / 2
    parts += [mid + 2**-9, mid - 2**-9, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65520.0, 6e-8])]
    parts.append(torch.tensor([2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-40, -1e-39, 5.96e-8, 6.1e-5, 6.09e-5]))
    return torch.cat(parts).numpy().astype(np.float32)


def test_bf16_and_fp16_rounding_equal_torch(lib):
    x = _samples()
    t = torch.from_numpy(x)
    for name, dtype in (("t_f32_to_bf16", torch.bfloat16), ("t_f32_to_f16", torch.float16)):
        ours = _call(lib, name, x, np.uint16)
        theirs = t.to(dtype).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(ours, theirs), (name, x[ours != theirs][:5])
    nan = _call(lib, "t_f32_to_bf16", np.array([np.nan], np.float32), np.uint16)
    assert torch.isnan(torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).float()).all()


def test_decoding_equals_torch(lib):
    every16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    for name, dtype in (("t_bf16_to_f32", torch.bfloat16), ("t_f16_to_f32", torch.float16)):
        ours = _call(lib, name, every16, np.float32)
        theirs = torch.from_numpy(every16.view(np.int16)).view(dtype).float().numpy()
        assert np.array_equal(ours, theirs, equal_nan=True), name
    every8 = np.arange(256, dtype=np.uint8)
    ours = _call(lib, "t_e4m3_to_f32", every8, np.float32)
    theirs = torch.from_numpy(every8).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(ours, theirs, equal_nan=True)


def test_e4m3_rounding_equals_torch(lib):
    """As the quantizer uses it: values clamped to [-448, 448] first, then rounded to nearest even."""
    x = np.clip(_samples() * np.float32(0.01), -448, 448)
    x = np.concatenate([x, np.arange(-450, 450, 0.0625, dtype=np.float32).clip(-448, 448)])
    x = np.concatenate([x, (np.arange(0, 64, dtype=np.float32) + 0.5) * 2**-9])  # subnormal ties
    ours = _call(lib, "t_f32_to_e4m3", x, np.uint8)
    theirs = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(ours, theirs), x[ours != theirs][:5]


@pytest.mark.parametrize("vec,threads,splits", [(8, 256, 1), (4, 256, 7), (8, 32, 64)])
def test_welford_statistics(lib, vec, threads, splits):
    """Mean and variance of a group as the kernels merge them, for a large mean beside a small
    spread (where sum(x^2) - n mean^2 in fp32 would lose every digit): fp32-exact to 1e-6."""
    g = torch.Generator().manual_seed(1)
    x = (100.0 + torch.randn(64 * 1024 * 8, generator=g, dtype=torch.float64)).float()
    out = np.empty(3, np.float32)
    lib.t_welford(_ptr(x.numpy()), ctypes.c_longlong(x.numel()), vec, threads, splits, _ptr(out))
    exact = x.double()
    assert abs(out[0] - exact.mean().item()) <= 1e-6 * 100
    assert abs(out[1] - exact.var(unbiased=False).item()) <= 1e-5
    assert abs(out[2] - 1 / (exact.var(unbiased=False).item() + 1e-6) ** 0.5) <= 1e-5


@pytest.mark.parametrize("dtype,code", [(torch.float32, 0), (torch.float16, 1), (torch.bfloat16, 2)], ids=str)
def test_normalise_silu_step_equals_the_reference(lib, dtype, code):
    """The apply pass's per-element math against groupnorm_silu_ref (one group: mean / rstd given)."""
    from fastflow.ops.reference import groupnorm_silu_ref

    g = torch.Generator().manual_seed(2)
    x = (torch.randn(1, 1, 64, 64, generator=g) * 3 + 0.5).to(dtype)
    w, b = 1.3, -0.2
    xf = x.float()
    mean, var = xf.mean().item(), xf.var(unbiased=False).item()
    rstd = float(np.float32(1) / np.sqrt(np.float32(var) + np.float32(1e-6)))
    out = np.empty(xf.numel(), np.float32)
    lib.t_norm_silu(code, _ptr(xf.numpy().ravel().copy()), _ptr(np.array([w, b], np.float32)),
                    ctypes.c_float(mean), ctypes.c_float(rstd), ctypes.c_longlong(xf.numel()), _ptr(out))  # fmt: skip
    expected = groupnorm_silu_ref(x, torch.tensor([w]).to(dtype), torch.tensor([b]).to(dtype), 1, 1e-6).float()
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(torch.from_numpy(out).reshape(expected.shape), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_per_token_quantization_equals_the_reference(lib, dtype):
    """amax, scale = amax / 448, codes of clamp(x * 448 / amax): fastflow's fp8_quantize_ref bit for bit
    (rows of wide ranges, a zero row, exact ties)."""
    from fastflow.ops.reference import fp8_quantize_ref

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1000, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 0.0, 1.0])[:, None]
    x[5, :64] = torch.arange(64) * 0.5 - 16  # many values that land on e4m3 rounding midpoints
    x = x.to(dtype)
    xf = np.ascontiguousarray(x.float().numpy())
    q, scale = np.empty(xf.shape, np.uint8), np.empty(6, np.float32)
    lib.t_fp8_quantize(_ptr(xf), ctypes.c_longlong(6), ctypes.c_longlong(1000), _ptr(q), _ptr(scale))
    ref_q, ref_scale = fp8_quantize_ref(x)
    assert np.array_equal(scale, ref_scale.numpy())
    assert np.array_equal(q, ref_q.view(torch.uint8).numpy())


def test_fp8_quantization_propagates_nan_and_inf_as_the_reference(lib):
    """A row holding NaN: NaN scale and NaN codes (fmaxf would drop the NaN and give a finite scale,
    the NaN a code of -448); an Inf: scale Inf, codes 0 and NaN (Inf * 0) where the reference has them."""
    from fastflow.ops.reference import fp8_quantize_ref

    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5)) * 3
    x[0, 9], x[1, 2], x[2, 63], x[3, 0], x[3, 1] = float("nan"), float("inf"), -float("inf"), float("nan"), float("inf")
    xf = np.ascontiguousarray(x.numpy())
    q, scale = np.empty(xf.shape, np.uint8), np.empty(5, np.float32)
    lib.t_fp8_quantize(_ptr(xf), ctypes.c_longlong(5), ctypes.c_longlong(64), _ptr(q), _ptr(scale))
    ref_q, ref_scale = fp8_quantize_ref(x)
    np.testing.assert_array_equal(scale, ref_scale.numpy())  # NaN where the reference has NaN
    ours = torch.from_numpy(q).view(torch.float8_e4m3fn).float()
    nan = ref_q.float().isnan()
    assert torch.equal(ours.isnan(), nan) and nan[0].all() and nan[3].all() and nan[1, 2] and nan[2, 63]
    assert torch.equal(torch.from_numpy(q)[~nan], ref_q.view(torch.uint8)[~nan])


def test_rope_pair_equals_the_reference_bit_for_bit(lib):
    from fastflow.ops.reference import rope_ref

    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, 64, 128, generator=g) * 5
    angles = torch.rand(64, 64, generator=g) * 50
    cos, sin = torch.cos(angles), torch.sin(angles)
    out = np.empty(x.numel(), np.float32)
    flat = x.numpy().ravel().copy()
    for t in range(64):  # one token's 64 pairs at a time, with that token's angles
        part = np.empty(128, np.float32)
        lib.t_rope(_ptr(flat[t * 128 : (t + 1) * 128].copy()), _ptr(cos[t].numpy().copy()),
                   _ptr(sin[t].numpy().copy()), ctypes.c_longlong(64), _ptr(part))  # fmt: skip
        out[t * 128 : (t + 1) * 128] = part
    assert np.array_equal(out.reshape(x.shape), rope_ref(x, cos, sin).numpy())


def test_rms_norm_equals_the_reference(lib):
    from fastflow.ops.reference import rms_norm_ref

    g = torch.Generator().manual_seed(5)
    x, scale = torch.randn(300, 128, generator=g) * 4, torch.rand(128, generator=g) + 0.5
    out = np.empty(x.numel(), np.float32)
    lib.t_rms_norm(_ptr(x.numpy().copy()), _ptr(scale.numpy().copy()), 128, ctypes.c_longlong(300),
                   ctypes.c_float(1e-6), _ptr(out))  # fmt: skip
    torch.testing.assert_close(torch.from_numpy(out).reshape(x.shape), rms_norm_ref(x, scale), rtol=2e-6, atol=2e-6)
