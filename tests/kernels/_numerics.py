"""Shared numerics checks of the kernel tests (tests/kernels/test_<op>.py): every Triton kernel on CPU
tensors under the interpreter, against the plain-torch reference.

Tolerance (flash-attention's rule): max|kernel - ref32| <= 2 * max|ref_lowp - ref32| + floor, where
ref32 is the reference on fp32 copies of the inputs and ref_lowp the reference in the test dtype.
Inputs sit inside NaN guard bands, so an out-of-bounds read shows up as NaN.
"""

import os

import torch

# Under the interpreter the kernels run on CPU tensors; with TRITON_INTERPRET=0 on a machine with
# a CUDA GPU (the GPU run book, bench/README.md) the same tests run the compiled kernels there.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def guarded(t: torch.Tensor, pad: int = 64) -> torch.Tensor:
    """A contiguous copy of t (on DEVICE) living inside a buffer whose borders are NaN."""
    buf = torch.full((t.numel() + 2 * pad,), float("nan"), dtype=t.dtype, device=DEVICE)
    buf[pad : pad + t.numel()] = t.reshape(-1).to(DEVICE)
    return buf[pad : pad + t.numel()].view(t.shape)


def rand(*shape, dtype, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return guarded((torch.randn(shape, generator=g) * scale + offset).to(dtype))


def check(kernel_out, reference_fn, inputs, dtype):
    """Apply the tolerance rule to one output or a tuple of outputs."""
    up = [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    ref32, reflow = reference_fn(*up), reference_fn(*inputs)
    outs = kernel_out if isinstance(kernel_out, tuple) else (kernel_out,)
    ref32 = ref32 if isinstance(ref32, tuple) else (ref32,)
    reflow = reflow if isinstance(reflow, tuple) else (reflow,)
    for out, r32, rlo in zip(outs, ref32, reflow, strict=True):
        assert out.dtype == dtype and out.shape == r32.shape
        assert torch.isfinite(out).all(), "NaN/Inf: out-of-bounds read or overflow"
        err = (out.float() - r32.float()).abs().max().item()
        budget = 2 * (rlo.float() - r32.float()).abs().max().item() + FLOOR[dtype]
        worst = (out.float() - r32.float()).abs().flatten().argmax().item()
        assert err <= budget, f"max err {err:.3e} > {budget:.3e} at flat index {worst}"
