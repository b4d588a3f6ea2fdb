"""attention_gelu_concat kernel under the Triton interpreter vs the reference (tolerance rule)."""

import pytest
import torch

import fastflow.ops as ops
from fastflow.ops import reference as ref

from ._numerics import DTYPES, check, rand


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,d,seq,m", [(3, 64, 5, 1500), (2, 128, 3, 40), (1, 16, 1, 1)])
def test_attention_gelu_concat(heads, d, seq, m, dtype):
    """Odd MLP widths (a masked tail, more than one block), the MLP as a strided slice of linear1."""
    from fastflow.kernels.attention_gelu_concat import attention_gelu_concat_fwd

    attn = rand(2, heads, seq, d, dtype=dtype)
    mlp = rand(2, seq, 3 * heads * d + m, dtype=dtype, seed=1, scale=3.0)[..., 3 * heads * d :]
    check(attention_gelu_concat_fwd(attn, mlp), ref.attention_gelu_concat_ref, (attn, mlp), dtype)


def test_head_dims_that_are_not_powers_of_two_run_the_reference():
    from fastflow.kernels.attention_gelu_concat import attention_gelu_concat_fwd, supported

    attn, mlp = rand(1, 2, 3, 24, dtype=torch.float32), rand(1, 3, 8, dtype=torch.float32, seed=1)
    assert not supported(attn)
    assert attention_gelu_concat_fwd(attn, mlp) is NotImplemented  # the op's registry runs the reference
    with ops.use_backend("triton"):
        assert torch.equal(ops.attention_gelu_concat(attn, mlp), ref.attention_gelu_concat_ref(attn, mlp))
