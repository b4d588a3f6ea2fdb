"""Flow-matching ODE solvers: x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0.

A solver takes ``velocity(x, step) -> v`` (a plain function: solvers never see a model), the
initial noise and a sigma schedule ending in 0, and returns x at the last sigma. ``step`` is a
:class:`Step`: the sigma of the evaluation (it *is* that float, so functions written as
``velocity(x, sigma)`` keep working) carrying which solver step and stage it belongs to. The state
is kept in fp32 whatever the velocity's dtype; ``callback(i, x, sigma_next)`` runs after each step
and may raise to interrupt, or return a tensor that replaces x.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import InputError


class Step(float):
    """One velocity evaluation: the float value is the sigma at which it happens.

    ``index``: the solver step (0 .. steps - 1) going from sigmas[index] to ``sigma_next``;
    ``steps``: their number; ``stage``: 0 for the step's first evaluation, 1 for a second one in
    the same step (Heun's corrector, evaluated at sigma_next); ``branch``: set by pipelines for the
    guidance pass it runs ("cond", "cfg" for a batched cond + uncond pass, "slg" for SD3.5's
    skip-layer pass). Caching policies key their state on (branch, index, stage).
    """

    __slots__ = ("index", "steps", "sigma_next", "stage", "branch")

    def __new__(cls, sigma: float, index: int, sigma_next: float, steps: int, stage: int = 0, branch=None):
        self = super().__new__(cls, sigma)
        self.index, self.steps, self.sigma_next, self.stage, self.branch = index, steps, sigma_next, stage, branch
        return self

    @property
    def sigma(self) -> float:
        return float(self)

    def with_branch(self, branch: str) -> Step:
        return Step(float(self), self.index, self.sigma_next, self.steps, self.stage, branch)

    def __repr__(self) -> str:
        return (
            f"Step(sigma={float(self)!r}, index={self.index}, sigma_next={self.sigma_next!r}, steps={self.steps}, "
            f"stage={self.stage}, branch={self.branch!r})"
        )


Velocity = Callable[[torch.Tensor, Step], torch.Tensor]
Callback = Callable[[int, torch.Tensor, float], None] | None


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * v.float()


def _sigmas(sigmas) -> list[float]:
    s = [float(v) for v in sigmas]
    if len(s) < 2 or any(b > a for a, b in zip(s, s[1:], strict=False)):
        raise InputError("sigmas must hold at least two non-increasing values (steps + 1, ending in 0)")
    return s


def _after(callback, i: int, x: torch.Tensor, sigma_next: float) -> torch.Tensor:
    """Run the step callback; a tensor it returns replaces the state (diffusers'
    ``callback_on_step_end`` may hand back new latents)."""
    out = callback(i, x, sigma_next)
    return x if out is None else out.float()


def euler(velocity: Velocity, x: torch.Tensor, sigmas, callback: Callback = None) -> torch.Tensor:
    """First-order: x += (sigma_next - sigma) v. Exact for a constant velocity field."""
    s, x = _sigmas(sigmas), x.float()
    n = len(s) - 1
    for i in range(n):
        x = euler_step(x, velocity(x, Step(s[i], i, s[i + 1], n)), s[i], s[i + 1])
        if callback:
            x = _after(callback, i, x, s[i + 1])
    return x


def heun(velocity: Velocity, x: torch.Tensor, sigmas, callback: Callback = None) -> torch.Tensor:
    """Second-order Heun (trapezoid with an Euler predictor); an Euler step into sigma = 0, where
    the velocity is not evaluated. Two velocity calls per step."""
    s, x = _sigmas(sigmas), x.float()
    n = len(s) - 1
    for i in range(n):
        v = velocity(x, Step(s[i], i, s[i + 1], n)).float()
        x_pred = euler_step(x, v, s[i], s[i + 1])
        if s[i + 1] > 0:  # the corrector: same step index, stage 1, evaluated at sigma_next
            v_next = velocity(x_pred, Step(s[i + 1], i, s[i + 1], n, stage=1)).float()
            x = x + (s[i + 1] - s[i]) * 0.5 * (v + v_next)
        else:
            x = x_pred
        if callback:
            x = _after(callback, i, x, s[i + 1])
    return x


def dpmpp_2m(velocity: Velocity, x: torch.Tensor, sigmas, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) in the flow form (SAI's default for SD3.5): with D = x - sigma v and
    lambda = -log sigma, x <- (sigma'/sigma) x - expm1(-h) D', D' the second-order multistep
    correction of D (first order on the first step and into sigma = 0)."""
    s, x = _sigmas(sigmas), x.float()
    old_denoised, h_last = None, None
    n = len(s) - 1
    for i in range(n):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = x - sigma * velocity(x, Step(sigma, i, sigma_next, n)).float()
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
            x = _after(callback, i, x, sigma_next)
    return x


SOLVERS: dict[str, Callable] = {"euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}


def get_solver(name: str) -> Callable:
    try:
        return SOLVERS[name]
    except KeyError:
        raise InputError(f"unknown sampler {name!r}; choose one of {sorted(SOLVERS)}") from None
