"""What the GPU in use can run, in one place (FP8 tensor cores need compute capability 8.9+, the
int8 GEMM ``torch._int_mm`` 8.0+)."""

from __future__ import annotations

import torch

FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores; Ampere does not
INT8_MIN_CAPABILITY = (8, 0)  # torch._int_mm's cuBLASLt int8 GEMM: Ampere and newer


def capability(device: torch.device | str) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def has_fp8_tensor_cores(device: torch.device | str) -> bool:
    cap = capability(device)
    return cap is not None and cap >= FP8_MIN_CAPABILITY


def fp8_runs_natively(device: torch.device | str) -> bool | None:
    """True where FP8 GEMMs run on tensor cores, False on a CUDA GPU without them (weights must be
    dequantized to be fast), None off CUDA (the reference path runs; no tensor cores to miss)."""
    cap = capability(device)
    return None if cap is None else cap >= FP8_MIN_CAPABILITY


def int8_runs_natively(device: torch.device | str) -> bool | None:
    """True where int8 GEMMs run on tensor cores through ``torch._int_mm`` (sm_80+), False on an
    older CUDA GPU, None off CUDA (on a CPU ``torch._int_mm`` runs oneDNN's int8 GEMM)."""
    cap = capability(device)
    return None if cap is None else cap >= INT8_MIN_CAPABILITY


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def usable_device(name, label: str = "device", cpu: str | None = None) -> str:
    """``name`` (a str or torch.device) if this torch build can use it, else an ``InputError`` that
    names ``label`` (the CLI's ``--device``, or ``pipe.to``) and says what to use instead (``cpu``:
    how to ask for the CPU there, by default ``{label} cpu``)."""
    from ..errors import InputError

    cpu = cpu or f"{label} cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"{label} {name!r} is not a device name: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA GPU"
            raise InputError(f"{label} {name}: CUDA is not available ({build}); use {cpu}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{label} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{label} {name}: MPS is not available on this machine; use {cpu}")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"{label} {name}: fastflow runs on cpu, cuda or mps")
    return name
