"""What the GPU in use can run, in one place (FP8 tensor cores need compute capability 8.9+)."""

from __future__ import annotations

import torch

FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores; Ampere does not


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


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
