"""Flow-matching ODE solvers: x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0.

A solver takes ``velocity(x, sigma) -> v`` (a plain function: solvers never see a model), the
initial noise and a sigma schedule ending in 0, and returns x at the last sigma. The state is kept
in fp32 whatever the velocity's dtype; ``callback(i, x, sigma)`` runs after each step and may
raise to interrupt.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import InputError

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
Callback = Callable[[int, torch.Tensor, float], None] | None


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * v.float()


def _sigmas(sigmas) -> list[float]:
    s = [float(v) for v in sigmas]
    if len(s) < 2 or any(b > a for a, b in zip(s, s[1:], strict=False)):
        raise InputError("sigmas must hold at least two non-increasing values (steps + 1, ending in 0)")
    return s


def euler(velocity: Velocity, x: torch.Tensor, sigmas, callback: Callback = None) -> torch.Tensor:
    """First-order: x += (sigma_next - sigma) v. Exact for a constant velocity field."""
    s, x = _sigmas(sigmas), x.float()
    for i in range(len(s) - 1):
        x = euler_step(x, velocity(x, s[i]), s[i], s[i + 1])
        if callback:
            callback(i, x, s[i + 1])
    return x


def heun(velocity: Velocity, x: torch.Tensor, sigmas, callback: Callback = None) -> torch.Tensor:
    """Second-order Heun (trapezoid with an Euler predictor); an Euler step into sigma = 0, where
    the velocity is not evaluated. Two velocity calls per step."""
    s, x = _sigmas(sigmas), x.float()
    for i in range(len(s) - 1):
        v = velocity(x, s[i]).float()
        x_pred = euler_step(x, v, s[i], s[i + 1])
        if s[i + 1] > 0:
            x = x + (s[i + 1] - s[i]) * 0.5 * (v + velocity(x_pred, s[i + 1]).float())
        else:
            x = x_pred
        if callback:
            callback(i, x, s[i + 1])
    return x


def dpmpp_2m(velocity: Velocity, x: torch.Tensor, sigmas, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) in the flow form (SAI's default for SD3.5): with D = x - sigma v and
    lambda = -log sigma, x <- (sigma'/sigma) x - expm1(-h) D', D' the second-order multistep
    correction of D (first order on the first step and into sigma = 0)."""
    s, x = _sigmas(sigmas), x.float()
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = x - sigma * velocity(x, sigma).float()
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            d = denoised
            if old_denoised is not None:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        if callback:
            callback(i, x, sigma_next)
    return x


SOLVERS: dict[str, Callable] = {"euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}


def get_solver(name: str) -> Callable:
    try:
        return SOLVERS[name]
    except KeyError:
        raise InputError(f"unknown sampler {name!r}; choose one of {sorted(SOLVERS)}") from None
