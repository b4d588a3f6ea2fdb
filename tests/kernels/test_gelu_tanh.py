"""gelu_tanh kernel(s) under the Triton interpreter vs the reference (tolerance rule: _numerics.py)."""

import pytest

from fastflow.ops import reference as ref

from ._numerics import DTYPES, check, rand


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [5125, 12288 * 2, 7])
def test_gelu_tanh(n, dtype):
    from fastflow.kernels.gelu_tanh import gelu_tanh_fwd

    x = rand(n, dtype=dtype, scale=4.0)
    check(gelu_tanh_fwd(x), ref.gelu_tanh_ref, (x,), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 12288), (5, 769)], ids=lambda s: "x".join(map(str, s)))
def test_bias_gelu_tanh(shape, dtype):
    from fastflow.kernels.gelu_tanh import bias_gelu_tanh_fwd

    x, bias = rand(*shape, dtype=dtype, scale=3.0), rand(shape[-1], dtype=dtype, seed=1)
    check(bias_gelu_tanh_fwd(x, bias), ref.bias_gelu_tanh_ref, (x, bias), dtype)
