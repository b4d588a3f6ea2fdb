"""layernorm_modulate kernel(s) under the Triton interpreter vs the reference (tolerance rule: _numerics.py)."""

import pytest
import torch

from fastflow.ops import reference as ref

from ._numerics import DTYPES, check, rand


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 3072), (1, 5, 769), (2, 1, 64)], ids=lambda s: "x".join(map(str, s)))
def test_layernorm_modulate(shape, dtype):
    from fastflow.kernels.layernorm_modulate import layernorm_modulate_fwd

    b, _, c = shape
    x = rand(*shape, dtype=dtype, scale=3.0, offset=1.0)
    shift, scale = rand(b, c, dtype=dtype, seed=1), rand(b, c, dtype=dtype, seed=2)
    check(layernorm_modulate_fwd(x, shift, scale, 1e-6), ref.layernorm_modulate_ref, (x, shift, scale, 1e-6), dtype)


def test_layernorm_modulate_strided_rows():
    from fastflow.kernels.layernorm_modulate import layernorm_modulate_fwd

    x = rand(2, 4, 200, dtype=torch.float32)[:, :, :96]  # row stride 200, last dim contiguous
    shift, scale = rand(2, 96, dtype=torch.float32, seed=1), rand(2, 96, dtype=torch.float32, seed=2)
    check(
        layernorm_modulate_fwd(x, shift, scale, 1e-6),
        ref.layernorm_modulate_ref,
        (x, shift, scale, 1e-6),
        torch.float32,
    )
