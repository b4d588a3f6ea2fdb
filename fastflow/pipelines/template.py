"""The prepare -> denoise -> decode template every pipeline runs.

A pipeline's ``__call__`` gathers its arguments and calls :meth:`TemplateMixin.generate`, which
runs the subclass's ``prepare`` (text / image conditioning, noise, schedule, and the velocity
function of a :class:`~fastflow.samplers.Step`), then the solver loop, then the VAE decode. The
transformer is called only through :meth:`TemplateMixin.predict`, with the step identity, so
caching policies have one place to plug in.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..caching import CacheStats
from ..caching.deepcache import family_policies, resolve_for_model
from ..errors import InputError, NumericalError
from ..models.modulation import precomputed_modulation
from ..samplers import Step
from .loop import DenoiseLoop
from .outputs import PipelineOutput, check_output_type, format_images

# The running generation's cache runner and work counters (per thread / task, never shared).
_ACTIVE_CACHE: contextvars.ContextVar = contextvars.ContextVar("fastflow_cache", default=None)
_ACTIVE_STATS: contextvars.ContextVar = contextvars.ContextVar("fastflow_stats", default=None)


@dataclass
class Plan:
    """What ``prepare`` hands the denoising loop: the initial state [B, ...] (fp32, on the device),
    the schedule, the solver, the velocity function of (x, Step), and how the final state becomes
    the VAE latent."""

    noise: torch.Tensor
    sigmas: torch.Tensor
    sampler: str
    velocity: Callable[[torch.Tensor, Step], torch.Tensor]
    seeds: list
    settings: dict
    to_latent: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    conditioning: torch.Tensor | None = None  # every step's modulation input [S * group, C] (precompute)
    conditioning_group: int = 1  # rows per forward call
    solver: Callable | None = None  # instead of the named sampler's (solver(velocity, x, sigmas, callback))
    timesteps: torch.Tensor | None = None  # the model's time per step, where it is not sigma * 1000 (SDXL)


class Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.timings[name] = timer.timings.get(name, 0.0) + time.perf_counter() - self.t0

        return _Stage()

    def done(self) -> dict[str, float]:
        self.timings["total"] = time.perf_counter() - self._start
        return self.timings


class TemplateMixin:
    """The template and the one door to the transformer; the family pipeline gives ``prepare``
    (and may give ``on_images``)."""

    check_output_type = staticmethod(check_output_type)
    format_images = staticmethod(format_images)

    def generate(
        self,
        output_type: str,
        callback,
        progress,
        cache=None,
        cache_threshold=None,
        ras_ratio=None,
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        **request,
    ):
        """The template: checks -> ``prepare`` (subclass) -> denoise -> decode -> format.

        Runs under ``torch.inference_mode`` (no autograd bookkeeping: 10% of a small model's step on
        a CPU); tensor results are handed back as ordinary tensors, usable anywhere."""
        try:
            # a split generation's collectives must not interleave with another call's: one at a time
            exclusive = self._parallel.lock if self._parallel is not None else contextlib.nullcontext()
            with torch.inference_mode(), exclusive:
                out = self._generate(output_type, callback, progress, (cache, cache_threshold, ras_ratio),
                                     callback_on_step_end, callback_on_step_end_tensor_inputs, request)  # fmt: skip
        finally:
            if self._offload is not None:
                self._offload.release()
        if isinstance(out.images, torch.Tensor):
            out.images = out.images.clone()  # outside inference mode: a normal tensor
        return out if return_dict else out.to_tuple()

    @staticmethod
    def check_request(request: dict, callback_on_step_end, tensor_inputs) -> None:
        """Argument errors a diffusers user can make, before any work: both of two ways to say one
        thing, the wrong types, a diffusers callback asking for tensors we do not hand over."""
        for a, b in (("prompt", "prompt_embeds"), ("negative_prompt", "negative_prompt_embeds"),
                     ("seed", "generator")):  # fmt: skip
            if request.get(a) is not None and request.get(b) is not None:
                raise InputError(f"pass {a} or {b}, not both")
        for name in ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                     "negative_pooled_prompt_embeds", "latents"):  # fmt: skip
            value = request.get(name)
            if value is not None and not isinstance(value, torch.Tensor):
                raise InputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        generator = request.get("generator")
        gens = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in gens):
            raise InputError(f"generator must be a torch.Generator or a list of them, got {generator!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise InputError(f"callback_on_step_end must be callable, got {callback_on_step_end!r}")
        names = () if tensor_inputs is None else tensor_inputs
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise InputError(f"callback_on_step_end_tensor_inputs must be a list of names, got {tensor_inputs!r}"[:200])
        unknown = sorted(set(names) - {"latents"})
        if unknown:
            raise InputError(f"callback_on_step_end_tensor_inputs: only 'latents' is handed over, not {unknown}")

    def _generate(self, output_type, callback, progress, caching, callback_on_step_end, tensor_inputs, request):
        timer = Timer()
        output_type = self.check_output_type(output_type)
        self.check_request(request, callback_on_step_end, tensor_inputs)
        if progress is not None and not isinstance(progress, bool):
            raise InputError(f"progress must be True, False or None, got {type(progress).__name__}")
        cache, cache_threshold, ras_ratio = caching
        if cache is None:
            cache = self.defaults.get("cache")  # fastflow.accelerate(pipe, cache=...)
        numbers = request.pop("cache_interval", None), request.pop("cache_branch", None)  # DeepCache's (UNets)
        policy, runner_class = resolve_for_model(
            cache, cache_threshold, *numbers, self.config, self.transformer, ras_ratio
        )
        parallel = self._parallel  # split over the ranks of a torch.distributed run (fastflow.parallel)
        if parallel is not None:
            request = parallel.request(request)
        plan = self.prepare(timer, SimpleNamespace(**request))
        if parallel is not None:
            parallel.plan(plan)
            plan.settings["parallel"] = parallel.describe()
        plan.settings["cache"] = None if policy is None else policy.describe()
        stats = CacheStats()
        runner = None if policy is None else runner_class(policy, self.transformer, stats)
        show = self.progress_bar if progress is None else progress
        loop = DenoiseLoop(
            self,
            plan.solver or plan.sampler,
            len(plan.sigmas) - 1,
            self.transformer.dtype,
            callback,
            show,
            callback_on_step_end,
            plan.timesteps,
        )
        tokens = _ACTIVE_CACHE.set(runner), _ACTIVE_STATS.set(stats)  # this generation's (thread / task)
        try:
            with timer.stage("denoise"), self.stage("transformer"):
                with self._modulation(plan), parallel.generation() if parallel else contextlib.nullcontext():
                    latent = plan.to_latent(loop.run(plan.velocity, plan.noise, plan.sigmas))
        finally:
            _ACTIVE_CACHE.reset(tokens[0])
            _ACTIVE_STATS.reset(tokens[1])
        stats = stats.as_dict()
        if output_type == "latent":
            return PipelineOutput(latent, plan.seeds, plan.settings, timer.done(), stats)
        with timer.stage("decode"), self.stage("vae"):
            pixels = self.decode_latent(latent, plan, show)
        if not torch.isfinite(pixels).all():
            raise NumericalError(
                f"NaN/Inf in the decoded image (VAE decode, {self.vae.dtype}): "
                + (
                    "float16 overflows in this VAE; decode in bfloat16 or float32"
                    if self.vae.dtype == torch.float16
                    else "check the VAE weights and its scaling_factor / shift_factor"
                )
            )
        images = self.format_images(pixels, output_type)
        self.on_images(images, output_type)
        return PipelineOutput(images, plan.seeds, plan.settings, timer.done(), stats)

    def prepare(self, timer: Timer, request: SimpleNamespace) -> Plan:
        raise NotImplementedError

    def decode_latent(self, latent: torch.Tensor, plan: Plan, progress: bool) -> torch.Tensor:
        """The final latent's pixels (in the "vae" stage). A video pipeline decodes its frames in
        chunks here (pipelines/svd.py); ``format_images`` then formats what this returns."""
        parallel = self._parallel
        return self.vae.decode(latent) if parallel is None else parallel.decode(self.vae.decode, latent)

    def on_images(self, images, output_type: str) -> None:
        """Called with the formatted images of each generation (FLUX Kontext keeps the last one)."""

    def _conditioning_table(self, rows, sigmas) -> torch.Tensor | None:
        """The modulation precompute's table: ``rows(sigma)`` (the adaLN inputs the forwards of one
        step compute, each as the forward computes it) for every sigma, concatenated; None when the
        transformer has no ``conditioning`` or ``pipe.defaults["precompute_modulation"]`` is False.
        Rows a forward then asks for but the table lacks are computed as usual (exact-match lookup)."""
        if getattr(self.transformer, "conditioning", None) is None or not self.defaults.get(
            "precompute_modulation", True
        ):
            return None
        with torch.no_grad(), self.stage("transformer"):
            return torch.cat([r for s in sigmas for r in rows(float(s))])

    def _modulation(self, plan: Plan):
        """Modulation precompute for the loop, when ``prepare`` built the conditioning table (it
        does unless ``pipe.defaults["precompute_modulation"]`` is False)."""
        if plan.conditioning is None:
            return contextlib.nullcontext()
        return precomputed_modulation(self.transformer, plan.conditioning, plan.conditioning_group)

    @property
    def cache_policies(self) -> tuple[str, ...]:
        """The ``cache=`` policies this pipeline's model runs."""
        return family_policies(self.transformer)

    def predict(self, step: Step, *args, **kwargs) -> torch.Tensor:
        """The transformer's output for one evaluation of the denoising loop; ``step`` (with its
        branch set) says which. The one place where pipelines call the transformer: with a cache
        policy, this generation's runner decides which blocks run."""
        runner = _ACTIVE_CACHE.get()
        if runner is not None:
            return runner(step, args, kwargs)
        stats = _ACTIVE_STATS.get()
        if stats is not None:
            n = getattr(self.transformer, "num_blocks", 0) - len(set(kwargs.get("skip_layers") or ()))
            stats.transformer_calls += 1
            stats.blocks_computed += n
            stats.blocks_total += n
        return self.transformer(*args, **kwargs)
