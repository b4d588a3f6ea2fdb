"""The FP8 GEMM's accumulation on sm_90: the mode the kernel sets (max_num_imprecise_acc) keeps the
error of the sum under a bound at FLUX's K = 3072 and 15360, in the emulation of Hopper's
limited-precision wgmma accumulator (tools/fp8_accumulation.py) and, on a GPU, in the compiled
kernel against the exact fp64 sum of the same FP8 codes."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from fastflow.kernels import fp8_gemm
from fastflow.kernels._common import meta

TOOL = Path(__file__).resolve().parents[2] / "tools" / "fp8_accumulation.py"
spec = importlib.util.spec_from_file_location("fp8_accumulation", TOOL)
emulation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(emulation)

BOUND = 6e-4  # relative RMS error of the sum; bf16 output rounding alone is about 1.1e-3
KS = (3072, 15360)  # FLUX's 3072-wide inputs and the single blocks' linear2


def _sm90_setting(m: int, k: int) -> int:
    a, b = meta(m, k, dtype=torch.float8_e4m3fn), meta(3072, k, dtype=torch.float8_e4m3fn)
    launch = fp8_gemm.plan(a, meta(m, dtype=torch.float32), b, meta(3072, dtype=torch.float32), None, False,
                           torch.bfloat16, arch=90)  # fmt: skip
    return launch.meta.get("IMPRECISE_ACC", emulation.NEVER)  # unset: Triton's sm_90 default


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", [4608, 1], ids=["large", "small"])
def test_the_sm90_accumulation_mode_keeps_the_error_bound(m, k):
    setting = _sm90_setting(m, k)
    assert 32 <= setting <= 128  # promoted at least every 4 wgmma; 0 would drop wgmma for mma.sync
    err = emulation.errors(k, emulation.interval_of(setting, k), rows=256)
    assert err["rel_rms"] <= BOUND, err


def test_the_emulation_tells_the_default_apart():
    """Triton's sm_90 default (never promoted) breaks the bound at K = 15360: the bound measures
    the accumulation, not the emulation's noise floor."""
    k = 15360
    err = emulation.errors(k, emulation.interval_of(emulation.NEVER, k), rows=256)
    assert err["rel_rms"] > 3 * BOUND, err


def test_the_emulation_is_exact_without_truncation():
    """Sums that fit 14 significant bits come out exact: the model only cuts what Hopper cuts."""
    a = torch.full((4, 3072), 0.5, dtype=torch.float64).numpy()
    b = torch.full((4, 3072), 2.0, dtype=torch.float64).numpy()
    assert (emulation.emulate(a, b, 3072) == 3072.0).all()
    assert emulation.interval_of(128, 3072) == 128 and emulation.interval_of(0, 3072) == 32


@pytest.mark.requires_cuda
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the compiled kernel on a GPU")
@pytest.mark.parametrize("k", KS)
def test_the_compiled_gemm_keeps_the_error_bound_on_a_gpu(k):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")
    qa, qw = emulation.flux_operands(k, rows=512)  # activations and weights, FP8 codes
    qb = qw[:384]
    a = torch.from_numpy(qa).to(torch.float8_e4m3fn).cuda()
    b = torch.from_numpy(qb).to(torch.float8_e4m3fn).cuda()
    one = torch.ones(1, dtype=torch.float32, device="cuda")
    got = fp8_gemm.fp8_scaled_mm_fwd(a, one, b, one, None, False, torch.float32).double().cpu()
    exact = torch.from_numpy(qa) @ torch.from_numpy(qb).T
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel <= BOUND, f"relative RMS error {rel:.2e} of the FP8 GEMM at K={k} (bound {BOUND:.0e})"
