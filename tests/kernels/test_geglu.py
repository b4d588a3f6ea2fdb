"""geglu kernel under the Triton interpreter vs the reference (tolerance rule: _numerics.py)."""

import pytest

from fastflow.ops import reference as ref

from ._numerics import DTYPES, check, rand


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 2 * 2560), (7, 2 * 5), (2, 33, 2 * 40)], ids=lambda s: "x".join(map(str, s)))
def test_geglu(shape, dtype):
    from fastflow.kernels.geglu import geglu_fwd

    x = rand(*shape, dtype=dtype, scale=3.0)
    check(geglu_fwd(x), ref.geglu_ref, (x,), dtype)
