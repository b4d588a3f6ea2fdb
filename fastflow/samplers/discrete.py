"""Discrete-time epsilon-prediction sampling (SDXL, SDXL-Turbo), in the sigma ("k-diffusion")
form of diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler.

A model trained on 1000 discrete timesteps with the scaled-linear beta schedule predicts the noise
eps of ``x_t``. With ``sigma_t = sqrt((1 - abar_t) / abar_t)`` the state ``x = x0 + sigma * eps``
moves along ``dx / dsigma = eps``: the model sees ``x / sqrt(sigma^2 + 1)`` at its timestep, and
the solvers of :mod:`fastflow.samplers.solvers` run unchanged on the sigmas below with eps in the
place of the velocity: ``euler`` is diffusers' EulerDiscreteScheduler, and ``dpmpp_2m`` (the same
sigma-form update for any x = x0 + sigma * d model) is its DPMSolverMultistepScheduler
(dpmsolver++, order 2) on :func:`dpm_schedule`'s sigmas. The start state is noise times
:func:`init_noise_sigma`; only the ancestral sampler needs a solver of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import InputError
from .solvers import Callback, Step, Velocity, _after, _sigmas

SPACINGS = ("leading", "trailing", "linspace")
TRAIN_STEPS = 1000


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, train_steps: int = TRAIN_STEPS
) -> torch.Tensor:
    """abar_t [train_steps] fp32: betas linear in sqrt between the ends (Stable Diffusion's schedule)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, train_steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def discrete_schedule(
    steps: int,
    spacing: str = "leading",
    steps_offset: int = 1,
    karras: bool = False,
    alphas_cumprod: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [steps + 1] fp32 ending in 0, timesteps [steps] fp32) as diffusers' Euler schedulers
    set them: "leading" (SDXL base, with ``steps_offset``), "trailing" (SDXL-Turbo) or "linspace"
    timesteps, sigmas interpolated linearly at them; ``karras``: Karras et al.'s rho = 7 spacing
    between the same end sigmas, each mapped back to its fractional timestep."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= TRAIN_STEPS:
        raise InputError(f"num_inference_steps must be an integer from 1 to {TRAIN_STEPS}, got {steps!r}")
    if spacing not in SPACINGS:
        raise InputError(f"timestep spacing {spacing!r}: choose one of {SPACINGS}")
    abar = scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    n = abar.shape[0]
    if spacing == "linspace":
        timesteps = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        timesteps = (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(np.float32) + steps_offset
    else:
        timesteps = np.arange(n, 0, -n / steps).round().copy().astype(np.float32) - 1
    table = (((1 - abar) / abar) ** 0.5).numpy()
    sigmas = np.interp(timesteps, np.arange(0, n), table)
    if karras:
        rho, ramp = 7.0, np.linspace(0, 1, steps)
        lo, hi = sigmas[-1].item() ** (1 / rho), sigmas[0].item() ** (1 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho
        timesteps = np.array([_sigma_to_t(s, np.log(table)) for s in sigmas])
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return torch.from_numpy(sigmas), torch.from_numpy(timesteps.astype(np.float32))


def init_noise_sigma(sigmas: torch.Tensor, spacing: str) -> float:
    """The standard deviation of the start state: sigma_max ("linspace", "trailing") or
    sqrt(sigma_max^2 + 1) ("leading"), as diffusers' Euler schedulers."""
    top = sigmas.max()
    return float(top if spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5)


def model_input_scale(sigma: float) -> float:
    """The model sees x / sqrt(sigma^2 + 1)."""
    return float((torch.tensor(sigma, dtype=torch.float32) ** 2 + 1) ** 0.5)


def euler_ancestral(
    velocity: Velocity,
    x: torch.Tensor,
    sigmas,
    noise: Callable[[int, tuple[int, ...]], torch.Tensor],
    callback: Callback = None,
) -> torch.Tensor:
    """Euler ancestral (eta 1): an Euler step down to sigma_down, then fresh noise of std sigma_up,
    with sigma_up^2 + sigma_down^2 = sigma_next^2. ``noise(i, shape)`` draws step i's noise (the
    pipeline's generators, in diffusers' order: one draw per step after the model call)."""
    s, x = _sigmas(sigmas), x.float()
    n = len(s) - 1
    for i in range(n):
        sigma, nxt = s[i], s[i + 1]
        eps = velocity(x, Step(sigma, i, nxt, n)).float()
        up = (nxt**2 * (sigma**2 - nxt**2) / sigma**2) ** 0.5
        down = (nxt**2 - up**2) ** 0.5
        x0 = x - sigma * eps  # the denoised estimate
        x = x + (x - x0) / sigma * (down - sigma)
        x = x + noise(i, tuple(x.shape)).to(x.device, x.dtype) * up
        if callback:
            x = _after(callback, i, x, nxt)
    return x


def dpm_schedule(steps: int, spacing: str = "linspace", steps_offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [steps + 1] fp32 ending in 0, integer timesteps [steps]) as diffusers'
    DPMSolverMultistepScheduler sets them (its own spacing rules: "linspace" and "leading" over
    steps + 1 points without the last, "trailing" as Euler's)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= TRAIN_STEPS:
        raise InputError(f"num_inference_steps must be an integer from 1 to {TRAIN_STEPS}, got {steps!r}")
    if spacing not in SPACINGS:
        raise InputError(f"timestep spacing {spacing!r}: choose one of {SPACINGS}")
    abar = scaled_linear_alphas_cumprod()
    n = abar.shape[0]
    if spacing == "linspace":
        timesteps = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = n // (steps + 1)
        timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    else:
        timesteps = np.arange(n, 0, -n / steps).round().copy().astype(np.int64) - 1
    table = (((1 - abar) / abar) ** 0.5).numpy()
    sigmas = np.concatenate([np.interp(timesteps, np.arange(0, n), table), [0.0]]).astype(np.float32)
    return torch.from_numpy(sigmas), torch.from_numpy(timesteps)
