"""The one backend switch, read at call time by every op wrapper.

"kernels" (default): call the ``fastflow::`` custom op, which runs the registered GPU kernel where
one exists for the tensors' device and the reference body everywhere else. "reference": call the
plain-torch reference directly (tests, benchmarks, debugging). "triton": call the Triton launcher
directly on any device (GPU A/B runs; on CPU tensors under TRITON_INTERPRET=1, the kernel tests);
ops without a Triton kernel fall back to their reference.

Autograd: the kernels are inference-only, so whenever grad is enabled and an input requires it,
the wrapper takes the reference path, which differentiates like any torch code.
"""

from __future__ import annotations

import contextlib

import torch

BACKENDS = ("reference", "kernels", "triton")
_backend = "kernels"


def set_backend(name: str) -> None:
    """Select "reference" or "kernels" for every fastflow op from now on."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown fastflow op backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily select a backend: ``with fastflow.ops.use_backend("reference"): ...``."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_reference(*tensors: torch.Tensor) -> bool:
    if _backend == "reference":
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def use_triton() -> bool:
    return _backend == "triton"
