"""Sigma schedules of the reference pipelines (REFERENCE.md sections 4.2-4.3), as fp64->fp32 tensors
of length steps + 1 that end in 0."""

from __future__ import annotations

import math

import torch

from ..errors import InputError


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"number of steps must be an integer >= 1, got {steps!r}")


def flux_mu(
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
) -> float:
    """mu linear in the packed image token count (not clamped: it extrapolates both ways)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - base_seq_len * m)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """e^mu / (e^mu + (1/t - 1)), with t = 0 mapped to 0."""
    out = torch.zeros_like(t)
    nz = t > 0
    out[nz] = math.exp(mu) / (math.exp(mu) + (1 / t[nz] - 1))
    return out


def flux_schedule(
    steps: int, image_seq_len: int, shift: bool = True, base_shift: float = 0.5, max_shift: float = 1.15
) -> torch.Tensor:
    """BFL ``get_schedule``: linspace(1, 0, steps + 1), time-shifted by mu(image tokens) unless
    ``shift`` is False (schnell). For Kontext, pass the target image's token count only."""
    _check_steps(steps)
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if shift:
        t = time_shift(flux_mu(image_seq_len, base_shift, max_shift), t)
    return t.float()


def sd3_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    """ModelSamplingDiscreteFlow: sigma(t) = shift * t / (1 + (shift - 1) * t), t in [0, 1]."""
    return shift * t / (1 + (shift - 1) * t)


def sd3_schedule(steps: int, shift: float = 3.0) -> torch.Tensor:
    """SAI ``get_sigmas``: timesteps linspace(1000 sigma_max, 1000 sigma_min, steps) through the
    shifted sigma, then 0. sigma_min is itself shifted, so the end point is shifted twice."""
    _check_steps(steps)
    sigma_max, sigma_min = (
        sd3_sigma(torch.tensor(1.0, dtype=torch.float64), shift),
        sd3_sigma(torch.tensor(1 / 1000, dtype=torch.float64), shift),
    )
    ts = torch.linspace(float(sigma_max) * 1000, float(sigma_min) * 1000, steps, dtype=torch.float64)
    return torch.cat([sd3_sigma(ts / 1000, shift), ts.new_zeros(1)]).float()
