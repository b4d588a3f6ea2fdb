"""The denoising loop: runs the solver over the schedule with a progress bar, the user callbacks,
interruption (one token per running generation) and a NaN/Inf check after every step."""

from __future__ import annotations

import threading

import torch

from ..errors import GenerationInterrupted, InputError, NumericalError
from ..samplers import get_solver


class DenoiseLoop:
    """Runs a solver with a progress bar, a user callback, interruption and a NaN/Inf check."""

    def __init__(self, pipeline, sampler: str, steps: int, dtype: torch.dtype, callback, progress: bool,
                 on_step_end=None, timesteps=None):  # fmt: skip
        solver = sampler if callable(sampler) else get_solver(sampler)  # a pipeline's own (SDXL: ancestral)
        self.pipeline, self.solver, self.steps = pipeline, solver, steps
        self.dtype, self.callback, self.progress = dtype, callback, progress
        self.on_step_end = on_step_end  # diffusers' callback_on_step_end(pipe, i, t, {"latents": x})
        self.timesteps = timesteps

    def _on_step_end(self, i: int, x: torch.Tensor, sigmas) -> torch.Tensor:
        """diffusers' ``callback_on_step_end(pipe, i, t, {"latents": x})`` with t the step's model
        time as diffusers' scheduler has it (sigma_i * 1000 for the flow models, the discrete
        timestep for SDXL); a returned ``latents`` replaces the state (same shape)."""
        t = self.timesteps[i].cpu() if self.timesteps is not None else torch.tensor(float(sigmas[i]) * 1000.0)
        out = self.on_step_end(self.pipeline, i, t, {"latents": x})
        if out is not None and not isinstance(out, dict):
            raise InputError(f"callback_on_step_end must return a dict (or None), got {type(out).__name__}")
        new = None if out is None else out.get("latents")
        if new is None:
            return x
        if not isinstance(new, torch.Tensor) or new.shape != x.shape:
            raise InputError(f"callback_on_step_end returned latents of shape {getattr(new, 'shape', None)}, "
                             f"expected {tuple(x.shape)}")  # fmt: skip
        return new.to(device=x.device, dtype=torch.float32)

    def run(self, velocity, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.steps, disable=not self.progress, desc="denoising", leave=False)

        def step_done(i, x, sigma):
            bar.update(1)
            if not torch.isfinite(x).all():
                raise NumericalError(
                    f"NaN/Inf in the latents after step {i + 1} while running in {self.dtype}: "
                    + (
                        "float16 overflows for this model; use torch.bfloat16 (or float32)"
                        if self.dtype == torch.float16
                        else "check the weights and inputs"
                    )
                )
            if self.callback is not None:
                self.callback(i, self.steps, x)
            if self.on_step_end is not None:
                x = self._on_step_end(i, x, sigmas)
            if self.token.is_set():
                raise GenerationInterrupted(f"interrupted after step {i + 1} of {self.steps}", latents=x, step=i)
            return x

        self.token = threading.Event()  # this generation's own flag: interrupt() sets the running ones
        self.pipeline._running.add(self.token)
        try:
            return self.solver(velocity, x, sigmas, callback=step_done)
        finally:
            self.pipeline._running.discard(self.token)
            bar.close()
