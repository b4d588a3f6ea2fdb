"""Make the Triton 3.8/3.9 CPU interpreter (TRITON_INTERPRET=1) compute bf16 like a GPU.

The interpreter keeps bf16 values as raw 16-bit patterns and runs numpy on them, so bf16
arithmetic, reductions and dots give garbage, and fp32 -> bf16 casts truncate instead of rounding
to nearest even (triton-lang/triton#11584, #4972). Kernels are written for the GPU; this layer,
imported by the kernel tests after TRITON_INTERPRET=1 is set, fixes the interpreter instead:
bf16 operands are decoded to fp32, results re-encoded with round-to-nearest-even. Casts to FP8
(which drop the rounding carry: 1.97 -> 1.0, triton-lang/triton#8322) go through torch's exact
round-to-nearest-even conversion, the GPU's cvt.rn for in-range values.
"""

from __future__ import annotations

import os

import numpy as np
import torch

ENABLED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def bf16_to_f32(bits) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values) -> np.ndarray:
    """Round to nearest even; NaN stays NaN."""
    f = np.asarray(values, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(f), np.uint16(0x7FC0), rounded)


def install() -> None:
    if not ENABLED:
        return
    import triton.language as tl
    from triton.runtime import interpreter as ti

    if getattr(ti, "_fastflow_compat", False):
        return
    handle, bf16, builder = ti.TensorHandle, tl.bfloat16, ti.InterpreterBuilder

    def is_bf16(h):
        return getattr(h.dtype, "scalar", h.dtype) == bf16

    def value(h):
        return bf16_to_f32(h.data) if is_bf16(h) else h.data

    def wrap(out, dtype):
        out = np.asarray(out)
        if out.dtype == np.bool_ or dtype != bf16:
            return handle(out, dtype)
        return handle(f32_to_bf16(out), bf16)

    original = {n: getattr(builder, n) for n in ("binary_op", "unary_op", "create_dot", "cast_impl", "create_fp_to_fp")}
    fp8 = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}

    def binary_op(self, lhs, rhs, op):
        if is_bf16(lhs) or is_bf16(rhs):
            return wrap(op(value(lhs), value(rhs)), lhs.dtype.scalar)
        return original["binary_op"](self, lhs, rhs, op)

    def unary_op(self, arg, op):
        if is_bf16(arg):
            return wrap(op(value(arg)), bf16)
        return original["unary_op"](self, arg, op)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a = handle(value(a), tl.float32) if is_bf16(a) else a
        b = handle(value(b), tl.float32) if is_bf16(b) else b
        if is_bf16(d):
            return handle(f32_to_bf16(np.matmul(a.data, b.data, dtype=np.float32) + value(d)), bf16)
        return original["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if d == bf16 and s != bf16 and (s.is_floating() or s.is_int()):
            return handle(f32_to_bf16(src.data.astype(np.float32)), bf16)
        return original["cast_impl"](self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        s, d = src.dtype.scalar, dst_type.scalar
        if d in fp8 and s in (tl.float32, tl.float16, bf16):
            values = torch.from_numpy(np.ascontiguousarray(value(src), dtype=np.float32))
            return handle(values.to(fp8[d]).view(torch.uint8).numpy(), d)
        return original["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    builder.create_fp_to_fp = create_fp_to_fp
    builder.binary_op, builder.unary_op = binary_op, unary_op
    builder.create_dot, builder.cast_impl = create_dot, cast_impl

    sum_op = ti.ReduceOps.sum

    def reduce_sum(self, input):
        if isinstance(input, tl.core.tensor) and input.dtype == bf16:
            total = np.sum(bf16_to_f32(input.handle.data), axis=self.axis, keepdims=self.keep_dims, dtype=np.float32)
            return self.to_tensor(f32_to_bf16(total), bf16)
        return sum_op(self, input)

    ti.ReduceOps.sum = reduce_sum
    ti._fastflow_compat = True
