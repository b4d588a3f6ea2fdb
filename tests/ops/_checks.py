"""Checks every op test runs: opcheck on CPU, torch.compile(fullgraph=True), backend agreement."""

from __future__ import annotations

import torch

import fastflow.ops as ops


def assert_op_contract(wrapper, op_overload, args: tuple) -> None:
    """opcheck passes, the wrapper under both backends and under fullgraph compile agree."""
    torch.library.opcheck(op_overload, args)
    with ops.use_backend("reference"):
        expected = wrapper(*args)
    with ops.use_backend("kernels"):
        got = wrapper(*args)
        compiled = torch.compile(wrapper, fullgraph=True)(*args)
    for e, g, c in zip(_as_tuple(expected), _as_tuple(got), _as_tuple(compiled), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
        torch.testing.assert_close(c, e, rtol=0, atol=0)
        assert g.is_contiguous() and g.dtype == e.dtype


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)
