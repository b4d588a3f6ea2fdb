"""FP8 e4m3 GEMM with the dequantization in the epilogue: C = epilogue((A @ B^T) * a_scale * b_scale + bias).

A [M, K] are quantized activations, B [N, K] the FP8 weights (nn.Linear's row-major layout is
K-major, what FP8 tensor cores want on both operands). Tiles are read through tensor descriptors
(TMA and wgmma on sm_90; sm_89 uses mma with cp.async), accumulated in fp32 over K; products of
e4m3 values are exact in fp32. The epilogue applies the per-row (token) or single activation scale,
the per-column (channel) or single weight scale, the bias and optionally GELU (tanh), then stores
C in the model dtype with masks, so M and N need not be tile multiples. TMA needs 16-byte aligned
row strides: K must be a multiple of 16 (every FLUX.1 / SD3.5 layer is); other K run the reference.
Programs are ordered in groups of GROUP_M row tiles so consecutive programs share B tiles in L2.

Accumulation (sm_90): the wgmma FP8 accumulator is not fp32. It keeps 14 significant bits and
truncates (DeepSeek-V3 report 3.5.2; SageAttention2: "FP22", e8m13), and Triton's sm_90 default
(max_num_imprecise_acc = 2**30) never promotes it: at FLUX's K = 15360 the emulated error of the
sum is 3.6e-3 relative (RMS), three times bf16's output rounding, and biased toward zero. Each
tl.dot here passes max_num_imprecise_acc = BLOCK_K: the partial sum of one K tile (128 on sm_90,
4 wgmma instructions, DeepSeek's interval) is added to an fp32 accumulator (64 fp32 adds per thread
per tile in the sm_90 PTX), which brings the error to 2.5e-4 at K = 15360 and 2.9e-4 at K = 3072,
independent of K. 32 (every instruction) halves that again at 4x the adds; 0 makes Triton 3.9
lower the dot to mma.sync instead of wgmma. Model and numbers: tools/fp8_accumulation.py,
docs/kernels.md. Other GPUs accumulate in fp32 (the setting is ignored there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Launch, arch_family, device_arch, ensure_allocator, meta, short
from .fp8_quantize import fp8_quantize_fwd, native
from .gelu_tanh import gelu_tanh_f32

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per (compute-capability major, tile class);
# "small" serves M <= 64 (modulation layers read their weights once per step: bandwidth-bound).
# Checked by tools/kernel_report.py for spills and shared memory on sm_89 / sm_90. Measured with
# Triton 3.9 (GELU epilogue): sm_90 128x128x128 w8 s4, 128 KB of shared memory: the promoted
# accumulation (IMPRECISE_ACC) keeps a second, wgmma-side accumulator, which 128x256 tiles cannot
# hold (255 registers and 264-272 B of spills; they fit only with Triton's unpromoted default);
# sm_89 128x128x64 w8 s4 128 registers, 48 KB of its 99 KB. sm_120 takes the sm_89 row.
CONFIGS = {
    (8, "large"): (128, 128, 64, 8, 4),
    (8, "small"): (64, 128, 128, 4, 3),
    (9, "large"): (128, 128, 128, 8, 4),
    (9, "small"): (64, 128, 128, 4, 4),
    (10, "large"): (128, 128, 128, 8, 4),  # sm_100: 128x256x128 spills 88 B (tcgen05); this: 178 regs
    (10, "small"): (64, 128, 128, 4, 4),
}
DEFAULT = (32, 32, 32, 4, 1)  # interpreter: small tiles keep the program count low and test tails
GROUP_M = 8


def imprecise_acc(block_k: int) -> int:
    """max_num_imprecise_acc of every tl.dot: one K tile, so the sm_90 wgmma partial sum is promoted
    to fp32 once per tile (every 128 K elements with the sm_90 configs; module docstring)."""
    return block_k


@triton.jit
def _fp8_gemm_fwd_kernel(
    a_ptr,  # [M, K] e4m3, row stride stride_am (16-byte multiple), last dim contiguous
    a_scale_ptr,  # [M] fp32 (PER_TOKEN) or [1]
    b_ptr,  # [N, K] e4m3, row stride stride_bn, last dim contiguous
    b_scale_ptr,  # [N] fp32 (PER_CHANNEL) or [1]
    bias_ptr,  # [N] (HAS_BIAS) or any pointer
    c_ptr,  # [M, N] out dtype, contiguous
    M,
    N,
    K,
    stride_am,
    stride_bn,
    PER_TOKEN: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    IMPRECISE_ACC: tl.constexpr,  # K elements between promotions of the sm_90 FP8 accumulator
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K):
        a = a_desc.load([off_m, k])  # [BLOCK_M, BLOCK_K]; out-of-range K and M read zeros
        b = b_desc.load([off_n, k])  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=IMPRECISE_ACC)

    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    if PER_TOKEN:
        a_scale = tl.load(a_scale_ptr + rows, mask=row_ok, other=0.0)
        acc = acc * a_scale[:, None]
    else:
        acc = acc * tl.load(a_scale_ptr)
    if PER_CHANNEL:
        b_scale = tl.load(b_scale_ptr + cols, mask=col_ok, other=0.0)
        acc = acc * b_scale[None, :]
    else:
        acc = acc * tl.load(b_scale_ptr)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = gelu_tanh_f32(acc)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def config_for(device: torch.device, m: int, arch: int | None = None) -> tuple[int, int, int, int, int]:
    if arch is None:
        if device.type != "cuda":
            return DEFAULT
        arch = device_arch(device)
    return CONFIGS.get((arch_family(arch), "small" if m <= 64 else "large"), DEFAULT)


def _weight_ok(b: torch.Tensor) -> bool:
    """B [N, K] as TMA reads it: unit last stride, 16-byte row stride and base address."""
    return b.stride(-1) == 1 and b.stride(0) % 16 == 0 and b.data_ptr() % 16 == 0


def supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """TMA-legal operands on a GPU with FP8 tensor cores (or the interpreter on CPU)."""
    if a.shape[1] % 16 or a.stride(-1) != 1 or a.stride(0) % 16 or not _weight_ok(b):
        return False
    if a.data_ptr() % 16:  # TMA base addresses (a view may start anywhere)
        return False
    return native(a)


def plan(a, a_scale, b, b_scale, bias, gelu: bool, out_dtype: torch.dtype, arch: int | None = None) -> Launch:
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    block_m, block_n, block_k, warps, stages = config_for(a.device, m, arch)
    a_scale, b_scale = a_scale.contiguous(), b_scale.contiguous()
    bias_arg = bias.contiguous() if bias is not None else b_scale
    return Launch(
        _fp8_gemm_fwd_kernel,
        (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),),
        (a, a_scale, b, b_scale, bias_arg, c, m, n, k, a.stride(0), b.stride(0)),
        {"PER_TOKEN": a_scale.numel() > 1,
         "PER_CHANNEL": b_scale.numel() > 1, "HAS_BIAS": bias is not None, "GELU": gelu,
         "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": GROUP_M,
         "IMPRECISE_ACC": imprecise_acc(block_k),
         "num_warps": warps, "num_stages": stages},
        c,
        reads=(a, a_scale, b, b_scale) + ((bias,) if bias is not None else ()),
        writes=(c,),
    )  # fmt: skip


def fp8_scaled_mm_fwd(a, a_scale, b, b_scale, bias, gelu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """The GEMM, or NotImplemented for operands TMA cannot read (the op runs its reference)."""
    if not supported(a, b):
        return NotImplemented
    launch = plan(a, a_scale, b, b_scale, bias, gelu, out_dtype)
    ensure_allocator(a.device)
    return launch()


def fp8_linear_fwd(x, w, w_scale, bias, static_scale, per_token: bool, gelu: bool) -> torch.Tensor:
    """Quantize x, then the GEMM; NotImplemented where either kernel cannot run (a GPU without FP8
    conversion, K not a multiple of 16, a misaligned weight): the op runs its reference, which
    quantizes bit for bit as the kernel does. The quantized x is a fresh contiguous tensor, so
    K % 16 and the weight decide whether the GEMM can take it."""
    if not native(x) or x.shape[-1] % 16 or not _weight_ok(w):
        return NotImplemented
    lead, k = x.shape[:-1], x.shape[-1]
    xq, x_scale = fp8_quantize_fwd(x.reshape(-1, k), static_scale, per_token)  # [M, K], [M] or [1]
    y = fp8_scaled_mm_fwd(xq, x_scale, w, w_scale, bias, gelu, x.dtype)  # [M, N]
    return y.reshape(*lead, w.shape[0])


# FLUX.1-dev linear layers at 1024x1024 (4096 image + 512 text tokens): name -> (M, K, N)
LINEAR_SHAPES = {
    "double qkv": (4096, 3072, 9216),
    "double proj": (4096, 3072, 3072),
    "double mlp.0": (4096, 3072, 12288),
    "double mlp.2": (4096, 12288, 3072),
    "single linear1": (4608, 3072, 21504),
    "single linear2": (4608, 15360, 3072),
    "txt qkv": (512, 3072, 9216),
    "modulation (double)": (1, 3072, 18432),
    "modulation (single)": (1, 3072, 9216),
}


def shipped(arch: int) -> list[tuple[str, Launch]]:
    if arch < 89:  # no FP8 tensor cores: FP8 layers are dequantized to bf16 at load
        return []
    out = []
    for name, (m, k, n) in LINEAR_SHAPES.items():
        for dt in (torch.bfloat16, torch.float16):
            a = meta(m, k, dtype=torch.float8_e4m3fn)
            b = meta(n, k, dtype=torch.float8_e4m3fn)
            gelu = name == "double mlp.0"
            launch = plan(
                a, meta(m, dtype=torch.float32), b, meta(n, dtype=torch.float32), meta(n, dtype=dt), gelu, dt, arch
            )
            bm, bn, bk, w, s = (launch.meta[x] for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
            out.append((f"fp8_gemm flux {name} {bm}x{bn}x{bk} w{w} s{s} {short(dt)}", launch))
    return out
