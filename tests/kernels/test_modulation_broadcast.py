"""Modulation vectors shared by the batch ([1, C], which the references broadcast) must not make a
row kernel read past them (NaN guard bands around every input show such reads), and shapes the
reference refuses are refused before a launch."""

import pytest
import torch

from fastflow.errors import InputError
from fastflow.ops import reference as ref

from ._numerics import check, rand

B, L, C = 3, 4, 96


def _vec(seed, rows=1):
    return rand(rows, C, dtype=torch.float32, seed=seed)


def _cases():
    from fastflow.kernels import fp8_quantize as fq
    from fastflow.kernels.gated_residual import gated_residual_fwd
    from fastflow.kernels.gated_residual_layernorm_modulate import gated_residual_layernorm_modulate_fwd
    from fastflow.kernels.layernorm_modulate import layernorm_modulate_fwd

    x, y = rand(B, L, C, dtype=torch.float32), rand(B, L, C, dtype=torch.float32, seed=9)
    return {
        "layernorm_modulate": (layernorm_modulate_fwd, ref.layernorm_modulate_ref, lambda v: (x, v(1), v(2), 1e-6)),
        "gated_residual": (gated_residual_fwd, ref.gated_residual_ref, lambda v: (x, v(1), y)),
        "gated_residual_layernorm_modulate": (
            gated_residual_layernorm_modulate_fwd,
            ref.gated_residual_layernorm_modulate_ref,
            lambda v: (x, v(1), y, v(2), v(3), 1e-6),
        ),
        "layernorm_modulate_fp8": (
            fq.layernorm_modulate_fp8_fwd,
            ref.layernorm_modulate_fp8_ref,
            lambda v: (x, v(1), v(2), 1e-6),
        ),
        "gated_residual_layernorm_modulate_fp8": (
            fq.gated_residual_layernorm_modulate_fp8_fwd,
            ref.gated_residual_layernorm_modulate_fp8_ref,
            lambda v: (x, v(1), y, v(2), v(3), 1e-6),
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "layernorm_modulate",
        "gated_residual",
        "gated_residual_layernorm_modulate",
        "layernorm_modulate_fp8",
        "gated_residual_layernorm_modulate_fp8",
    ],
)
def test_one_vector_for_the_whole_batch(name):
    kernel, reference, make = _cases()[name]
    args = make(lambda seed: _vec(seed))
    got = kernel(*args)
    if "fp8" in name:  # FP8 outputs: the same bits as the reference (shown exact in test_fp8.py)
        expected = reference(*args)
        for g, e in zip(got if isinstance(got, tuple) else (got,), expected, strict=True):
            assert torch.isfinite(g.float()).all()
            if g.dtype == torch.float8_e4m3fn:
                assert (g.float() - e.float()).abs().max() <= e.float().abs().max() / 8
            else:
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    else:
        check(got, reference, args, torch.float32)


def test_vectors_of_another_batch_size_are_refused():
    kernel, _, make = _cases()["layernorm_modulate"]
    with pytest.raises(InputError, match=r"shift must have shape \[3, 96\] or \[1, 96\], got \[2, 96\]"):
        kernel(*make(lambda seed: _vec(seed, rows=2)))
