"""GELU (tanh) fused with per-token FP8 quantization under the interpreter: bit for bit the unfused
kernels (gelu_tanh, then the quantizer's reference), within one FP8 step of the plain-torch
reference (whose GELU differs from the kernels' in the last bit), NaN / Inf as the reference."""

import pytest
import torch

import fastflow.ops as ops
from fastflow.ops import reference as ref
from fastflow.ops.fp8 import gelu_tanh_fp8_quantize, gelu_tanh_fp8_quantize_ref

from ._numerics import rand
from .test_fp8 import _same_bits, same_with_nans

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 96), (3, 769), (2, 12288)], ids=lambda s: "x".join(map(str, s)))
def test_equals_gelu_then_quantize(shape, dtype):
    from fastflow.kernels.gelu_fp8_quantize import gelu_tanh_fp8_quantize_fwd
    from fastflow.kernels.gelu_tanh import gelu_tanh_fwd

    x = rand(*shape, dtype=dtype, scale=3.0)
    q, scale = gelu_tanh_fp8_quantize_fwd(x)
    _same_bits((q, scale), ref.fp8_quantize_ref(gelu_tanh_fwd(x), None, True))
    q_ref, scale_ref = gelu_tanh_fp8_quantize_ref(x)
    torch.testing.assert_close(scale, scale_ref, rtol=2e-3, atol=0)
    step = scale_ref[:, None] * 32  # an e4m3 step at the top of the range: 32 codes of 448
    assert ((q.float() * scale[:, None] - q_ref.float() * scale_ref[:, None]).abs() <= step).all()


def test_strided_rows_and_the_op():
    x = rand(4, 200, dtype=torch.bfloat16, scale=2.0)[:, :96]  # row stride 200
    with ops.use_backend("triton"):
        got = gelu_tanh_fp8_quantize(x)
    from fastflow.kernels.gelu_tanh import gelu_tanh_fwd

    _same_bits(got, ref.fp8_quantize_ref(gelu_tanh_fwd(x.contiguous()), None, True))
    assert ops.OPS["gelu_tanh_fp8_quantize"].impls["triton"].startswith("fastflow.kernels.gelu_fp8_quantize")


def test_nan_and_inf_propagate():
    from fastflow.kernels.gelu_fp8_quantize import gelu_tanh_fp8_quantize_fwd

    x = rand(4, 64, dtype=torch.float32).clone()
    x[0, 3], x[1, 5], x[2, 7] = float("nan"), float("inf"), -float("inf")
    from fastflow.kernels.gelu_tanh import gelu_tanh_fwd

    same_with_nans(gelu_tanh_fp8_quantize_fwd(x), ref.fp8_quantize_ref(gelu_tanh_fwd(x), None, True))
