"""SVD's EDM sampling (fastflow.samplers.edm) against diffusers' EulerDiscreteScheduler configured
by SVD's scheduler_config.json and StableVideoDiffusionPipeline's guidance ramp: the same sigmas,
timesteps, init_noise_sigma and c_in, and the same final latents for a stand-in v model run through
both loops."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _append_dims

from fastflow import errors
from fastflow.samplers import cfg, euler
from fastflow.samplers.edm import (
    c_noise,
    edm_derivative,
    edm_euler,
    edm_euler_step,
    edm_init_noise_sigma,
    edm_scalings,
    edm_schedule,
    guidance_enabled,
    guidance_ramp,
    karras_sigmas,
    scale_model_input,
    v_to_x0,
)

# stabilityai/stable-video-diffusion-img2vid(-xt) scheduler/scheduler_config.json
SVD_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "trained_betas": None,
    "use_karras_sigmas": True,
}


def svd_scheduler(steps: int) -> EulerDiscreteScheduler:
    ref = EulerDiscreteScheduler.from_config({"_class_name": "EulerDiscreteScheduler", **SVD_SCHEDULER})
    ref.set_timesteps(steps)
    return ref


class FakeV:
    """A fixed random linear function of the model input and the timestep (the stand-in UNet)."""

    def __init__(self, channels: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=g) / channels**0.5
        self.b = torch.randn(channels, generator=g) * 0.1
        self.calls: list[float] = []

    def __call__(self, x_in: torch.Tensor, t) -> torch.Tensor:
        self.calls.append(float(t))
        y = torch.einsum("...chw,dc->...dhw", x_in, self.w)
        return y + (self.b * float(t))[:, None, None] + 0.3 * float(t) * x_in


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("steps", [1, 2, 4, 14, 25, 30])
def test_schedule_equals_diffusers(steps):
    ref = svd_scheduler(steps)
    sigmas, timesteps = edm_schedule(steps)
    assert sigmas.dtype == timesteps.dtype == torch.float32
    assert sigmas.shape == (steps + 1,) and float(sigmas[-1]) == 0.0
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=1e-6, atol=0)
    torch.testing.assert_close(timesteps, ref.timesteps.float(), rtol=1e-6, atol=1e-7)
    assert edm_init_noise_sigma(sigmas) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    assert float(sigmas[0]) == pytest.approx(700.0, rel=1e-6)
    x = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(steps))
    for i, t in enumerate(ref.timesteps):
        ref._step_index = None  # each t is looked up afresh
        torch.testing.assert_close(scale_model_input(x, sigmas[i]), ref.scale_model_input(x, t), rtol=1e-6, atol=0)
        assert float(c_noise(sigmas[i])) == pytest.approx(float(t), rel=1e-6, abs=1e-7)


def test_known_values():
    """The numbers of SVD's 25-step schedule (facts, from a diffusers run): a check that does not lean
    on the diffusers installed here."""
    sigmas, timesteps = edm_schedule(25)
    assert sigmas[:4].tolist() == pytest.approx([700.0, 545.72925, 421.56912, 322.45367], rel=1e-6)
    assert sigmas[-3:].tolist() == pytest.approx([0.0078825, 0.002, 0.0], rel=1e-4)
    assert float(timesteps[0]) == pytest.approx(1.6377701, rel=1e-6)
    assert float(timesteps[-1]) == pytest.approx(-1.5536521, rel=1e-6)
    assert edm_init_noise_sigma(sigmas) == pytest.approx(700.000732, rel=1e-7)
    assert karras_sigmas(1).tolist() == [700.0, 0.0]


def test_scalings_are_sgm_v_scaling():
    """sgm's VScalingWithEDMcNoise: c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1), c_in = 1/sqrt(s^2+1),
    c_noise = 0.25 ln s; x0 = c_skip x + c_out v."""
    for s in (700.0, 3.5, 0.002):
        c_skip, c_out, c_in, cn = (float(c) for c in edm_scalings(s))
        assert c_skip == pytest.approx(1 / (s * s + 1), rel=1e-6)
        assert c_out == pytest.approx(-s / (s * s + 1) ** 0.5, rel=1e-6)
        assert c_in == pytest.approx(1 / (s * s + 1) ** 0.5, rel=1e-6)
        assert cn == pytest.approx(0.25 * torch.tensor(s).log().item(), rel=1e-6)
        x, v = torch.randn(3, 4), torch.randn(3, 4)
        torch.testing.assert_close(v_to_x0(v, x, s), c_skip * x + c_out * v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 3, 25])
def test_single_steps_equal_diffusers(steps):
    ref = svd_scheduler(steps)
    sigmas = ref.sigmas
    g = torch.Generator().manual_seed(10 + steps)
    for i, t in enumerate(ref.timesteps):
        x = torch.randn(1, 2, 4, 3, 3, generator=g) * float(sigmas[i])
        v = torch.randn(1, 2, 4, 3, 3, generator=g)
        ref._step_index = i
        out = ref.step(v, t, x)
        torch.testing.assert_close(edm_euler_step(v, x, sigmas[i], sigmas[i + 1]), out.prev_sample, rtol=1e-6, atol=0)
        torch.testing.assert_close(v_to_x0(v, x, sigmas[i]), out.pred_original_sample, rtol=1e-6, atol=0)


@pytest.mark.parametrize("steps", [1, 2, 8, 25])
@pytest.mark.parametrize("guided", [False, True])
def test_denoising_loop_equals_diffusers(steps, guided):
    """The pipeline's loop (scale_model_input, the model, CFG with the per-frame ramp, step) through
    diffusers' scheduler and through edm_euler give the same latents."""
    batch, frames, channels = 2, 5, 4
    model = FakeV(channels)
    noise = torch.randn(batch, frames, channels, 6, 8, generator=torch.Generator().manual_seed(steps))
    lo, hi = (1.0, 3.0) if guided else (1.0, 1.0)
    assert guidance_enabled(lo, hi) is guided

    def guided_v(x_in, t):
        if not guided:
            return model(x_in, t)
        return model(torch.cat([x_in - 0.1, x_in]), t).chunk(2)  # [uncond ; cond], uncond made different

    ref = svd_scheduler(steps)
    latents = noise * ref.init_noise_sigma
    scale = _append_dims(torch.linspace(lo, hi, frames).unsqueeze(0).to(latents.dtype).repeat(batch, 1), latents.ndim)
    for t in ref.timesteps:
        v = guided_v(ref.scale_model_input(latents, t), t)
        if guided:
            v = v[0] + scale * (v[1] - v[0])
        latents = ref.step(v, t, latents).prev_sample
    ref_calls, model.calls = model.calls, []

    sigmas, timesteps = edm_schedule(steps)
    ramp = guidance_ramp(lo, hi, frames, batch)

    def predict_v(x_in, step):
        v = guided_v(x_in, c_noise(step))
        return cfg(v[1], v[0], ramp) if guided else v

    ours = edm_euler(predict_v, noise * edm_init_noise_sigma(sigmas), sigmas)
    assert model.calls == pytest.approx(ref_calls, rel=1e-6)
    assert rel(ours, latents) <= 1e-6, rel(ours, latents)
    # the same through the generic solver and the derivative
    assert rel(euler(edm_derivative(predict_v), noise * edm_init_noise_sigma(sigmas), sigmas), latents) <= 1e-6


def test_guidance_ramp_equals_pipeline():
    for lo, hi, frames, batch in ((1.0, 3.0, 14, 1), (1.5, 3.0, 25, 2), (1.0, 2.5, 2, 3), (2.0, 2.0, 1, 1)):
        ref = torch.linspace(lo, hi, frames).unsqueeze(0).to("cpu", torch.float32).repeat(batch, 1)
        ref = _append_dims(ref, 5)
        ours = guidance_ramp(lo, hi, frames, batch)
        assert ours.shape == (batch, frames, 1, 1, 1)
        assert torch.equal(ours, ref)
    ramp = guidance_ramp(1.0, 3.0, 14)
    assert ramp.flatten()[[0, 1, -2, -1]].tolist() == pytest.approx([1.0, 1.1538462, 2.8461538, 3.0], rel=1e-6)
    half = guidance_ramp(1.0, 3.0, 14, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, ramp.to(torch.bfloat16))


def test_guidance_enabled_rule():
    assert guidance_enabled(1.0, 3.0) and guidance_enabled(0.0, 1.01)
    assert not guidance_enabled(1.0, 1.0) and not guidance_enabled(0.5, 1.0)
    with pytest.raises(errors.InputError, match="max_guidance_scale"):
        guidance_enabled(3.0, 1.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: karras_sigmas(0),
        lambda: karras_sigmas(2.0),
        lambda: karras_sigmas(True),
        lambda: karras_sigmas(10_000),
        lambda: karras_sigmas(4, sigma_min=0.0),
        lambda: karras_sigmas(4, sigma_min=800.0),
        lambda: karras_sigmas(4, sigma_max=float("nan")),
        lambda: karras_sigmas(4, rho=-1.0),
        lambda: guidance_ramp(1.0, float("inf"), 4),
        lambda: guidance_ramp("1", 3.0, 4),
        lambda: guidance_ramp(1.0, 3.0, 0),
        lambda: guidance_ramp(1.0, 3.0, 4, batch=0),
        lambda: guidance_enabled(None, 3.0),
    ],
)
def test_bad_arguments_are_typed_errors(call):
    with pytest.raises(errors.InputError):
        call()


def test_numpy_and_tensor_scalars_accepted():
    import numpy as np

    assert torch.equal(guidance_ramp(np.float32(1.0), torch.tensor(3.0), 4), guidance_ramp(1.0, 3.0, 4))
