"""gated_residual_layernorm_modulate kernel under the Triton interpreter vs the reference (see _numerics.py)."""

import pytest

from fastflow.ops import reference as ref

from ._numerics import DTYPES, check, rand


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 3072), (1, 5, 769)], ids=lambda s: "x".join(map(str, s)))
def test_gated_residual_layernorm_modulate(shape, dtype):
    from fastflow.kernels.gated_residual_layernorm_modulate import gated_residual_layernorm_modulate_fwd

    b, _, c = shape
    x, y = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype, seed=1)
    gate, shift, scale = (rand(b, c, dtype=dtype, seed=s) for s in (2, 3, 4))
    out = gated_residual_layernorm_modulate_fwd(x, gate, y, shift, scale, 1e-6)
    check(out, ref.gated_residual_layernorm_modulate_ref, (x, gate, y, shift, scale, 1e-6), dtype)
