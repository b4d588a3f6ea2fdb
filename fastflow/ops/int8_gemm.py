"""The exact int8 GEMM (int8 x int8 -> int32) behind every int8 op, per device.

* CPU: ``torch._int_mm`` (oneDNN: AVX512-VNNI / AMX where the CPU has them) takes every shape.
* CUDA, compute capability 8.0+ (Ampere, Ada, Hopper, Blackwell): ``torch._int_mm`` (cuBLASLt,
  int8 tensor cores), which wants M > 16 and K, N multiples of 8: smaller or unaligned operands are
  padded with zero rows / columns (zeros add nothing to an integer sum) and the result is sliced.
* CUDA before 8.0, and other devices: refused with an :class:`~fastflow.errors.InputError` that says
  what to use (bf16 / fp16 weights, or the CPU). No slow emulation: a W8A8 model exists to be fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from .capability import INT8_MIN_CAPABILITY, capability, device_name

CUDA_MIN_ROWS = 17  # torch._int_mm on CUDA: M > 16
CUDA_ALIGN = 8  # ... and K, N multiples of 8


def check_int8_device(device: torch.device | str) -> None:
    """Raise unless int8 GEMMs run natively on ``device`` (a CPU, or a CUDA GPU with sm_80+)."""
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return
    if device.type == "cuda":
        cap = capability(device)
        if cap >= INT8_MIN_CAPABILITY:
            return
        raise InputError(
            f"int8 (W8A8) layers need int8 tensor cores through torch._int_mm (sm_80 or newer); "
            f"{device_name(device)} has none: load this GPU's model with quant=None in bf16 / fp16"
        )
    raise InputError(
        f"int8 (W8A8) layers run on a CPU or a CUDA GPU with sm_80+, not on {device.type}: "
        "load with quant=None (bf16 / fp16) there, or use device='cpu'"
    )


def int_mm_padding(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Zero rows / columns to add to M, K and N for torch._int_mm on CUDA."""
    return max(0, CUDA_MIN_ROWS - m), -k % CUDA_ALIGN, -n % CUDA_ALIGN


def padded_int_mm(xq: torch.Tensor, w: torch.Tensor, mm=torch._int_mm) -> torch.Tensor:
    """xq [M, K] @ w [N, K]^T through ``mm`` (torch._int_mm) with CUDA's shape rules met by zero
    padding; [M, N] int32, exact."""
    (m, k), n = xq.shape, w.shape[0]
    pad_m, pad_k, pad_n = int_mm_padding(m, k, n)
    if pad_m or pad_k:
        xq = F.pad(xq, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        w = F.pad(w, (0, pad_k, 0, pad_n))
    out = mm(xq, w.t())  # [M + pad_m, N + pad_n]
    return out[:m, :n] if pad_m or pad_n else out


def int8_mm(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """xq [M, K] int8 @ w [N, K]^T int8 -> [M, N] int32, exact. On CPU fastest when ``w`` is stored
    column-major (``w.t()`` contiguous), as :class:`fastflow.quant.Int8Linear` keeps it."""
    if xq.device.type == "cpu":
        return torch._int_mm(xq, w.t())
    check_int8_device(xq.device)
    return padded_int_mm(xq, w).contiguous()
