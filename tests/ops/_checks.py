"""Checks every op test runs: opcheck on CPU, torch.compile(fullgraph=True), backend agreement."""

from __future__ import annotations

import torch

import fastflow.ops as ops

# opcheck's schema test compares tensors with allclose, which torch lacks for float8 on CPU; ops
# with FP8 inputs or outputs run every other opcheck test (the bitwise comparisons below cover the rest)
FP8_OPCHECK_TESTS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def assert_op_contract(wrapper, op_overload, args: tuple, fp8: bool = False, contiguous: bool = True) -> None:
    """opcheck passes, the wrapper under both backends and under fullgraph compile agree, in value
    and memory layout (contiguous unless the op documents another layout)."""
    if fp8:
        torch.library.opcheck(op_overload, args, test_utils=FP8_OPCHECK_TESTS)
    else:
        torch.library.opcheck(op_overload, args)
    with ops.use_backend("reference"):
        expected = wrapper(*args)
    with ops.use_backend("kernels"):
        got = wrapper(*args)
        compiled = torch.compile(wrapper, fullgraph=True)(*args)
    for e, g, c in zip(_as_tuple(expected), _as_tuple(got), _as_tuple(compiled), strict=True):
        if e.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            e, g, c = (t.view(torch.uint8) for t in (e, g, c))
        torch.testing.assert_close(g, e, rtol=0, atol=0)
        torch.testing.assert_close(c, e, rtol=0, atol=0)
        assert g.dtype == e.dtype and g.stride() == e.stride() == c.stride()
        assert g.is_contiguous() or not contiguous


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)
