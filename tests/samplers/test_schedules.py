"""Schedules against diffusers' FlowMatchEulerDiscreteScheduler (REFERENCE.md 4.2-4.4)."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from fastflow.errors import InputError
from fastflow.samplers import flux_mu, flux_schedule, sd3_schedule

from ..conftest import diffusers_flux_scheduler


def _diffusers_flux(steps, seq_len, dynamic=True):
    sched = diffusers_flux_scheduler(dynamic)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched.sigmas.float()


@pytest.mark.parametrize("height,width", [(1024, 1024), (512, 512), (768, 1360), (256, 256), (2048, 1024)])
@pytest.mark.parametrize("steps", [4, 28, 50])
def test_flux_dynamic_shift(height, width, steps):
    seq_len = (height // 16) * (width // 16)
    torch.testing.assert_close(flux_schedule(steps, seq_len), _diffusers_flux(steps, seq_len), rtol=0, atol=1e-6)


def test_flux_reference_values():
    assert flux_mu(4096) == pytest.approx(1.15) and flux_mu(1024) == pytest.approx(0.63)
    s = flux_schedule(28, 4096)
    torch.testing.assert_close(s[:4], torch.tensor([1.0, 0.9884, 0.9762, 0.9634]), rtol=0, atol=1e-4)
    torch.testing.assert_close(s[-3:], torch.tensor([0.1955, 0.1047, 0.0]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_schnell_is_unshifted(steps):
    torch.testing.assert_close(
        flux_schedule(steps, 4096, shift=False), _diffusers_flux(steps, 4096, dynamic=False), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("steps", [1, 4, 28, 40, 50])
def test_sd3_shift3(steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    torch.testing.assert_close(sd3_schedule(steps), sched.sigmas.float(), rtol=0, atol=1e-6)


def test_sd3_turbo_values_and_double_shifted_end():
    torch.testing.assert_close(sd3_schedule(4), torch.tensor([1.0, 0.8577, 0.6022, 0.0089, 0.0]), rtol=0, atol=1e-4)
    assert sd3_schedule(40)[-2].item() == pytest.approx(0.00893, abs=1e-5)


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_bad_step_counts(steps):
    with pytest.raises(InputError, match="steps"):
        flux_schedule(steps, 4096)
    with pytest.raises(InputError, match="steps"):
        sd3_schedule(steps)
