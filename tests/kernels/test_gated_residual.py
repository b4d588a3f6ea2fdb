"""gated_residual kernel(s) under the Triton interpreter vs the reference (tolerance rule: _numerics.py)."""

import pytest

from fastflow.ops import reference as ref

from ._numerics import DTYPES, check, rand


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 3072), (1, 7, 769)], ids=lambda s: "x".join(map(str, s)))
def test_gated_residual(shape, dtype):
    from fastflow.kernels.gated_residual import gated_residual_fwd

    x, y = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype, seed=1)
    gate = rand(shape[0], shape[2], dtype=dtype, seed=2)
    check(gated_residual_fwd(x, gate, y), ref.gated_residual_ref, (x, gate, y), dtype)
