"""Discrete-time epsilon sampling (SDXL's schedulers) against diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler: the same schedules, and the same final sample for a fixed
stand-in eps model (a smooth function of the scaled input and the timestep), to 1e-5."""

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from fastflow import errors
from fastflow.samplers import euler
from fastflow.samplers.discrete import (
    discrete_schedule,
    euler_ancestral,
    init_noise_sigma,
    model_input_scale,
    scaled_linear_alphas_cumprod,
)

SDXL = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def eps_model(x_in, t):
    """A stand-in noise predictor: nonlinear in the input, dependent on the timestep."""
    return torch.tanh(x_in) * (0.5 + float(t) / 2000) + 0.05 * x_in.roll(1, dims=-1)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [1, 4, 30])
def test_schedule_and_euler_equal_diffusers(spacing, karras, steps):
    ref = EulerDiscreteScheduler(**SDXL, timestep_spacing=spacing, use_karras_sigmas=karras)
    ref.set_timesteps(steps)
    sigmas, timesteps = discrete_schedule(steps, spacing, karras=karras)
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=1e-6, atol=0)
    torch.testing.assert_close(timesteps, ref.timesteps, rtol=1e-6, atol=1e-4)
    assert init_noise_sigma(sigmas, spacing) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = noise * ref.init_noise_sigma
    for t in ref.timesteps:
        x = ref.step(eps_model(ref.scale_model_input(x, t), t), t, x).prev_sample

    def velocity(x, step):
        return eps_model(x / model_input_scale(step.sigma), timesteps[step.index])

    ours = euler(velocity, noise * init_noise_sigma(sigmas, spacing), sigmas)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spacing,steps", [("trailing", 1), ("trailing", 4), ("leading", 20)])
def test_euler_ancestral_equals_diffusers(spacing, steps):
    ref = EulerAncestralDiscreteScheduler(**SDXL, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x = noise * ref.init_noise_sigma
    for t in ref.timesteps:
        x = ref.step(eps_model(ref.scale_model_input(x, t), t), t, x, generator=g).prev_sample

    sigmas, timesteps = discrete_schedule(steps, spacing)
    mine = torch.Generator().manual_seed(2)

    def velocity(x, step):
        return eps_model(x / model_input_scale(step.sigma), timesteps[step.index])

    ours = euler_ancestral(
        velocity, noise * init_noise_sigma(sigmas, spacing), sigmas, lambda i, shape: torch.randn(shape, generator=mine)
    )
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_schedule_facts_and_errors():
    abar = scaled_linear_alphas_cumprod()
    assert abar.shape == (1000,) and abar[0] > 0.999 and 0.004 < abar[-1] < 0.005  # SD's schedule ends near 0.0047
    sigmas, timesteps = discrete_schedule(1, "trailing")  # SDXL-Turbo, one step: from the last timestep
    assert timesteps.tolist() == [999.0] and sigmas[-1] == 0
    assert discrete_schedule(4, "trailing")[1].tolist() == [999.0, 749.0, 499.0, 249.0]
    assert discrete_schedule(4, "leading")[1].tolist() == [751.0, 501.0, 251.0, 1.0]
    with pytest.raises(errors.InputError, match="spacing"):
        discrete_schedule(4, "sideways")
    with pytest.raises(errors.InputError, match="num_inference_steps"):
        discrete_schedule(0)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 8, 25])
def test_dpmpp_2m_equals_diffusers(spacing, steps):
    """The flow solver's DPM++(2M) is the sigma-form update for eps models too."""
    from diffusers import DPMSolverMultistepScheduler

    from fastflow.samplers import dpmpp_2m
    from fastflow.samplers.discrete import dpm_schedule

    ref = DPMSolverMultistepScheduler(**SDXL, timestep_spacing=spacing, algorithm_type="dpmsolver++", solver_order=2)
    ref.set_timesteps(steps)
    sigmas, timesteps = dpm_schedule(steps, spacing)
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=1e-6, atol=0)
    assert timesteps.tolist() == ref.timesteps.tolist()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x = noise * ref.init_noise_sigma  # 1: diffusers keeps the alpha-scaled state
    for t in ref.timesteps:
        x = ref.step(eps_model(ref.scale_model_input(x, t), t), t, x).prev_sample

    def velocity(x, step):
        return eps_model(x / model_input_scale(step.sigma), timesteps[step.index])

    ours = dpmpp_2m(velocity, noise * model_input_scale(float(sigmas[0])), sigmas)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
