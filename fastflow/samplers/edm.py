"""EDM sampling of Stable Video Diffusion: Karras sigmas, v-prediction preconditioning, Euler and
the per-frame guidance ramp, as diffusers' StableVideoDiffusionPipeline runs them with its
EulerDiscreteScheduler (``use_karras_sigmas``, ``sigma_min`` 0.002, ``sigma_max`` 700,
``prediction_type`` "v_prediction", ``timestep_type`` "continuous", ``timestep_spacing``
"leading") and as sgm's ``VScalingWithEDMcNoise`` / ``EDMDiscretization`` /
``LinearPredictionGuider`` define them.

The state is ``x = x0 + sigma * eps``. The model sees ``c_in * x`` (``c_in = 1 / sqrt(sigma^2 + 1)``)
at the timestep ``c_noise = 0.25 * log(sigma)`` and predicts v; the denoised estimate is
``x0 = c_skip * x + c_out * v`` (``c_skip = 1 / (sigma^2 + 1)``, ``c_out = -sigma / sqrt(sigma^2 + 1)``),
and Euler moves x along ``d = (x - x0) / sigma``. :func:`edm_derivative` turns a v-prediction
function into that d, so :func:`fastflow.samplers.euler` (and caching, callbacks, the Step
bookkeeping) runs unchanged; :func:`edm_euler` is that composition. Every scalar is computed as a
float32 tensor, as diffusers does, so the numbers agree to the last bit or two in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..errors import InputError, plain_number
from .solvers import Callback, Step, Velocity, euler

SIGMA_MIN = 0.002
SIGMA_MAX = 700.0
RHO = 7.0
MAX_STEPS = 1000
MAX_FRAMES = 1024

# the callable a pipeline hands to edm_derivative: the c_in-scaled state and the Step -> v (guided)
VPrediction = Callable[[torch.Tensor, Step], torch.Tensor]


def _number(value, name: str) -> float:
    value = plain_number(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def karras_sigmas(
    steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> torch.Tensor:
    """[steps + 1] fp32: Karras et al.'s spacing ``(max^(1/rho) + ramp (min^(1/rho) - max^(1/rho)))^rho``
    over ``ramp = linspace(0, 1, steps)`` in float64, then the final 0 (diffusers' final_sigmas_type
    "zero"). One step gives [sigma_max, 0]."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"num_inference_steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    lo, hi, rho = _number(sigma_min, "sigma_min"), _number(sigma_max, "sigma_max"), _number(rho, "rho")
    if not 0 < lo < hi or rho <= 0:
        raise InputError(f"need 0 < sigma_min < sigma_max and rho > 0, got {lo!r}, {hi!r}, {rho!r}")
    ramp = np.linspace(0, 1, steps)
    sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def _sigma(sigma) -> torch.Tensor:
    """A sigma as the 0-d fp32 tensor diffusers computes with (a Step is its float value)."""
    return sigma.detach().float().cpu() if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma))


def c_noise(sigma) -> torch.Tensor:
    """The model's timestep for ``sigma``: 0.25 * log(sigma), 0-d fp32 (timestep_type "continuous")."""
    return 0.25 * _sigma(sigma).log()


def edm_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """[steps] fp32: :func:`c_noise` of every sigma but the final 0 (the scheduler's ``timesteps``)."""
    return torch.stack([c_noise(s) for s in sigmas[:-1]])


def edm_schedule(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [steps + 1], timesteps [steps]) for SVD's scheduler config."""
    sigmas = karras_sigmas(steps)
    return sigmas, edm_timesteps(sigmas)


def edm_init_noise_sigma(sigmas: torch.Tensor) -> float:
    """The start state's standard deviation: sqrt(sigma_max^2 + 1) in fp32 (the scheduler's
    ``init_noise_sigma`` with timestep_spacing "leading": 700.000732 for SVD, not 700)."""
    return float((sigmas.float().max() ** 2 + 1) ** 0.5)


def edm_scalings(sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) of the v-prediction EDM preconditioning, 0-d fp32 tensors."""
    s = _sigma(sigma)
    return 1 / (s**2 + 1), -s / (s**2 + 1) ** 0.5, 1 / (s**2 + 1) ** 0.5, 0.25 * s.log()


def scale_model_input(x: torch.Tensor, sigma) -> torch.Tensor:
    """What the model sees: x / sqrt(sigma^2 + 1) (c_in x), in x's dtype."""
    return x / ((_sigma(sigma) ** 2 + 1) ** 0.5)


def v_to_x0(v: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """The denoised estimate from the model's v: c_out v + c_skip x, with x upcast to fp32 (as
    EulerDiscreteScheduler.step)."""
    s = _sigma(sigma)
    return v * (-s / (s**2 + 1) ** 0.5) + x.float() / (s**2 + 1)


def edm_euler_step(v: torch.Tensor, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step from sigma to sigma_next, fp32 (diffusers' step with s_churn 0, before its
    cast back to the model output's dtype)."""
    s, x = _sigma(sigma), x.float()
    d = (x - v_to_x0(v, x, s)) / s
    return x + d * (_sigma(sigma_next) - s)


def edm_derivative(predict_v: VPrediction) -> Velocity:
    """The velocity the solvers integrate, dx/dsigma = (x - x0) / sigma, from ``predict_v(x_in,
    step)``: the (guided) v of the model at the c_in-scaled state ``x_in`` (fp32; cast it to the
    model's dtype there) and the Step (its timestep is ``c_noise(step)``)."""

    def derivative(x: torch.Tensor, step: Step) -> torch.Tensor:
        s = _sigma(float(step))
        x = x.float()
        return (x - v_to_x0(predict_v(scale_model_input(x, s), step), x, s)) / s

    return derivative


def edm_euler(predict_v: VPrediction, x: torch.Tensor, sigmas, callback: Callback = None) -> torch.Tensor:
    """SVD's sampler: :func:`fastflow.samplers.euler` on :func:`edm_derivative`. ``x`` is the start
    state (noise times :func:`edm_init_noise_sigma`); the state stays fp32 between steps (diffusers
    rounds it to the model's dtype after each step: the same in fp32)."""
    return euler(edm_derivative(predict_v), x, sigmas, callback)


def guidance_enabled(min_guidance_scale, max_guidance_scale) -> bool:
    """Whether the pipeline runs the unconditional branch: max_guidance_scale > 1 (diffusers decides
    on max_guidance_scale alone). A ramp that rises above 1 only through min_guidance_scale (min > 1
    >= max) is refused: diffusers would build an unguided batch and then guide it."""
    lo = _number(min_guidance_scale, "min_guidance_scale")
    hi = _number(max_guidance_scale, "max_guidance_scale")
    if lo > 1 >= hi:
        raise InputError(
            f"min_guidance_scale {lo} > 1 >= max_guidance_scale {hi}: guidance is decided by max_guidance_scale; "
            "raise max_guidance_scale above 1 to guide, or set both to at most 1 for no guidance"
        )
    return hi > 1


def guidance_ramp(
    min_guidance_scale,
    max_guidance_scale,
    num_frames: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """[batch, num_frames, 1, 1, 1]: per-frame guidance scales linspace(min, max, num_frames) in
    float32, then cast to ``dtype`` (the latents' dtype), the first frame at min and the last at max,
    the same for every batch row; broadcasts against [batch, F, C, h, w] velocities in
    :func:`fastflow.samplers.cfg`."""
    lo = _number(min_guidance_scale, "min_guidance_scale")
    hi = _number(max_guidance_scale, "max_guidance_scale")
    for name, n, top in (("num_frames", num_frames, MAX_FRAMES), ("batch", batch, 1 << 16)):
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= top:
            raise InputError(f"{name} must be an integer from 1 to {top}, got {n!r}")
    ramp = torch.linspace(lo, hi, num_frames).unsqueeze(0).to(device, dtype).repeat(batch, 1)
    return ramp[:, :, None, None, None]
