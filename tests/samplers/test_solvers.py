"""Solvers on problems with known answers: a constant field, and the exact flow of Gaussian data.

For x0 ~ N(mu, s^2) and x_sigma = (1 - sigma) x0 + sigma eps, the ideal velocity is linear in x and
the probability-flow ODE maps eps at sigma = 1 to x0 = mu + s * eps exactly, so the error of a
solver against that is its discretisation error alone.
"""

import math

import pytest
import torch

from fastflow.errors import InputError
from fastflow.samplers import (
    SOLVERS,
    cfg,
    cfg_batched,
    dpmpp_2m,
    euler,
    get_solver,
    heun,
    skip_layer_guidance,
    slg_active,
)

MU, S = 0.7, 0.3


def gaussian_velocity(x, sigma):
    var = (1 - sigma) ** 2 * S**2 + sigma**2
    denoised = MU + (1 - sigma) * S**2 / var * (x - (1 - sigma) * MU)
    return (x - denoised) / sigma


def exact(eps, sigma):
    """The ODE solution at sigma started from eps at sigma = 1."""
    return (1 - sigma) * MU + math.sqrt((1 - sigma) ** 2 * S**2 + sigma**2) * eps


def _error(solver, steps, end=0.0):
    """Max error at ``end``: sigmas uniform to 0, or uniform in log(sigma) down to end > 0 (the
    steps DPM-Solver is designed for; a uniform grid into 0 has log-steps that do not shrink)."""
    eps = torch.linspace(-2, 2, 9)
    if end == 0.0:
        sigmas = torch.linspace(1, 0, steps + 1)
    else:
        sigmas = torch.logspace(0, math.log10(end), steps + 1, dtype=torch.float64).float()
    return (solver(gaussian_velocity, eps, sigmas) - exact(eps, end)).abs().max().item()


def test_euler_is_exact_on_a_constant_field():
    v = torch.tensor([0.5, -2.0, 3.0])
    x = euler(lambda x, s: v, torch.zeros(3), torch.tensor([1.0, 0.8, 0.33, 0.1, 0.0]))
    torch.testing.assert_close(x, -v, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order_on_the_gaussian_flow(name, order):
    errors = [_error(SOLVERS[name], n, end=0.02) for n in (16, 32, 64)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
    assert all(abs(r - order) < 0.35 for r in rates), f"{name}: errors {errors}, observed orders {rates}"


def test_second_order_solvers_beat_euler_into_zero():
    assert _error(heun, 16) < _error(euler, 16) / 5
    assert _error(dpmpp_2m, 16) < _error(euler, 16) / 5


def test_dpmpp_2m_is_exact_when_the_denoised_estimate_is_constant():
    x0 = torch.tensor([0.3, -1.2])
    eps = torch.tensor([1.0, 0.5])
    out = dpmpp_2m(lambda x, s: (x - x0) / s, eps, torch.tensor([1.0, 0.6, 0.2, 0.05, 0.0]))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)


def test_callback_sees_every_step_and_can_interrupt():
    seen = []

    def callback(i, x, sigma):
        seen.append((i, sigma))
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        euler(lambda x, s: x, torch.zeros(2), torch.linspace(1, 0, 5), callback=callback)
    assert seen == [(0, 0.75), (1, 0.5)]


def test_state_stays_fp32_with_a_bf16_velocity():
    out = heun(lambda x, s: x.bfloat16(), torch.ones(3), torch.linspace(1, 0, 3))
    assert out.dtype == torch.float32


def test_bad_sigmas_and_names():
    with pytest.raises(InputError):
        euler(gaussian_velocity, torch.zeros(1), torch.tensor([1.0]))
    with pytest.raises(InputError):
        euler(gaussian_velocity, torch.zeros(1), torch.tensor([0.0, 1.0]))
    with pytest.raises(InputError, match="unknown sampler"):
        get_solver("ddim")


def test_guidance_rules():
    c, u, k = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.5])
    assert cfg(c, u, 4.5).item() == 1.0 + 4.5
    assert cfg_batched(lambda x2, s: torch.cat((c, u)) * x2, torch.ones(1), 0.5, 3.0).item() == 4.0
    assert skip_layer_guidance(torch.tensor([0.0]), c, k, 2.5).item() == 1.25
    assert [i for i in range(50) if slg_active(i, 50)] == list(range(1, 10))  # 0.5 < i < 10
