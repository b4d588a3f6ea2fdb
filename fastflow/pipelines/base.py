"""What every pipeline shares: the prepare -> denoise -> decode template, sizes, seeds and noise,
the denoising loop, outputs, checks.

A pipeline's ``__call__`` gathers its arguments and calls :meth:`BasePipeline.generate`, which runs
the subclass's ``prepare`` (text / image conditioning, noise, schedule, and the velocity function
of a :class:`~fastflow.samplers.Step`), then the solver loop, then the VAE decode. The transformer
is called only through :meth:`BasePipeline.predict`, with the step identity, so caching policies
have one place to plug in.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import math
import random
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..errors import GenerationInterrupted, InputError, MissingComponentError, NumericalError
from ..samplers import Step, get_solver
from .images import load_image, to_numpy, to_pil, to_tensor, to_unit
from .offload import text_models

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The running generation's cache runner and work counters (per thread / task, never shared).
_ACTIVE_CACHE: contextvars.ContextVar = contextvars.ContextVar("fastflow_cache", default=None)
_ACTIVE_STATS: contextvars.ContextVar = contextvars.ContextVar("fastflow_stats", default=None)


@dataclass
class PipelineOutput:
    """images (per ``output_type``), the seed of each image (None when a generator was given),
    the settings actually used and per-stage wall times in seconds."""

    images: object
    seeds: list[int | None]
    settings: dict
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # transformer work (see fastflow.caching.CacheStats)

    def __getitem__(self, key):
        """diffusers' output access: ``out[0]`` (the images) or ``out["images"]``."""
        if isinstance(key, str):
            return getattr(self, key)
        return (self.images,)[key]

    def to_tuple(self) -> tuple:
        return (self.images,)


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


def as_prompt_list(prompt, what: str = "prompt") -> list[str]:
    if prompt is None:
        raise InputError(f"pass a {what} (or precomputed embeddings)")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")
    if any(not p.strip() for p in prompts) and what == "prompt":
        warnings.warn("empty prompt: the image will be unconditioned on text", UserWarning, stacklevel=3)
    return prompts


def check_negatives(negatives: int, prompts: int) -> None:
    """One negative prompt (or embedding) per prompt."""
    if negatives != prompts:
        raise InputError(
            f"{negatives} negative prompts for {prompts} prompts: pass one negative prompt (a string) or one per prompt"
        )


def resolve_size(height, width, default: tuple[int, int], multiple: int, max_side: int) -> tuple[int, int]:
    """Round height/width down to ``multiple`` (with a warning, as the references do)."""
    height = default[0] if height is None else height
    width = default[1] if width is None else width
    if not isinstance(height, int) or not isinstance(width, int):
        raise InputError(f"height and width must be integers, got {height!r} x {width!r}")
    h, w = height // multiple * multiple, width // multiple * multiple
    if (h, w) != (height, width):
        warnings.warn(f"{height}x{width} is not a multiple of {multiple}; using {h}x{w}", UserWarning, stacklevel=3)
    if h < multiple or w < multiple:
        raise InputError(f"height and width must be at least {multiple}, got {height}x{width}")
    if max(h, w) > max_side:
        raise InputError(f"{h}x{w} exceeds this model's limit of {max_side} px per side")
    return h, w


MAX_STEPS = 10_000  # FLUX-dev uses 28-50; no sampler needs more
MAX_IMAGES_PER_CALL = 64  # default of BasePipeline.max_images_per_call (memory grows with it)
SEED_LIMIT = 2**64  # torch.Generator seeds are unsigned 64-bit


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_steps(steps) -> int:
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"num_inference_steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    return steps


def check_seeds(seed, n: int) -> list[int] | None:
    """n seeds from ``seed`` (an int: seed, seed + 1, ...; a list: one per image; None or -1:
    random), each in [0, 2**64)."""
    if seed is None or (_is_int(seed) and seed == -1):
        return None
    seeds = list(seed) if isinstance(seed, (list, tuple)) else None
    if seeds is None:
        if not _is_int(seed):
            raise InputError(f"seed must be an integer (or -1 for random), got {seed!r}")
        seeds = [seed + i for i in range(n)]
    elif len(seeds) != n:
        raise InputError(f"got {len(seeds)} seeds for {n} images")
    bad = [s for s in seeds if not _is_int(s) or not 0 <= s < SEED_LIMIT]
    if bad:
        raise InputError(f"seeds must be integers in [0, 2**64) (-1: random), got {bad[0]!r}")
    return seeds


def draw_noise(n: int, shape: tuple[int, ...], seed, generator) -> tuple[torch.Tensor, list[int | None]]:
    """n noise tensors of ``shape`` on the CPU in fp32, one seed each (seed, seed + 1, ...; random
    seeds when none is given), so an image depends on its seed only, not on batch size or device."""
    if generator is not None:
        gens = generator if isinstance(generator, list) else [generator] * n
        if len(gens) != n:
            raise InputError(f"got {len(gens)} generators for {n} images")
        return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]), [None] * n
    base = check_seeds(seed, n) or [random.randrange(2**63) for _ in range(n)]
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in base]
    return torch.stack(noise), base


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


class BasePipeline:
    """Common state (modules, defaults from the model config, progress bar, interruption) and the
    prepare -> denoise -> decode template."""

    progress_bar = True

    def __init__(self, transformer, vae, text_encoder=None, default_size: tuple[int, int] | None = None):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.config = transformer.config
        sampling = self.config.sampling
        self.defaults = sampling.as_dict()  # per-pipeline copy: callers may adjust it
        self.default_size = tuple(default_size or sampling.size)
        self.view_upscale = sampling.view_upscale  # the CLI's default PNG upscale
        self._running: set[threading.Event] = set()  # one token per running generation
        self._prompt_cache: collections.OrderedDict = collections.OrderedDict()  # see encode_text
        self._prompt_lock = threading.Lock()
        self.max_images_per_call = MAX_IMAGES_PER_CALL

    def interrupt(self) -> None:
        """Stop the generations running now (each after its current step, raising
        GenerationInterrupted). Each generation has its own token, so a call starting at the same
        moment neither clears this request nor is stopped by it."""
        for token in list(self._running):
            token.set()

    def images_per_call(self, n_prompts: int, per_prompt) -> int:
        """The number of images of one call, checked against ``max_images_per_call``."""
        if not _is_int(per_prompt) or per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be an integer >= 1, got {per_prompt!r}")
        n = n_prompts * per_prompt
        if n > self.max_images_per_call:
            raise InputError(
                f"{n} images in one call exceeds max_images_per_call={self.max_images_per_call}: "
                "make several calls, or raise pipe.max_images_per_call if the memory allows"
            )
        return n

    def to(self, device=None, dtype: torch.dtype | None = None):
        """diffusers' ``pipe.to("cuda")`` / ``pipe.to(torch.bfloat16)`` / ``pipe.to("cuda", torch.bfloat16)``:
        moves (and casts) the transformer, the VAE and the text encoders; returns the pipeline. T5
        is never cast to float16 (it overflows there): it keeps its dtype, with a warning."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if device is not None:
            from ..ops.capability import usable_device
            from .offload import check_not_offloaded

            check_not_offloaded(self, "pipe.to(device)")
            device = torch.device(usable_device(device, "pipe.to", 'pipe.to("cpu")'))
        self.transformer.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        for name, model in text_models(self.text_encoder).items():
            cast = dtype
            if name == "t5" and dtype == torch.float16:
                warnings.warn("T5 overflows in float16: it keeps its dtype", UserWarning, stacklevel=2)
                cast = None
            model.to(device=device, dtype=cast)
        return self

    _offload = None  # a ModelOffload while enable_model_cpu_offload is on
    _lora = None  # the transformer's LoraManager, created by the first load_lora

    # -- LoRA (fastflow.adapters) -------------------------------------------------------------------
    def load_lora(self, path, scale: float = 1.0, name: str | None = None, fuse: bool = False) -> str:
        """Load a LoRA file (diffusers / PEFT, kohya, BFL or XLabs format) onto the transformer and
        return its name (default: the file name without suffix). ``fuse=True`` adds it into the
        weights (no cost per step; ``unfuse_lora`` restores them exactly); otherwise it runs beside
        the layers and ``set_lora_scales`` switches it without recompiling a compiled model. Keys
        that match no layer are listed in a warning; a LoRA of another family or size is an error."""
        from ..adapters import LoraManager

        if self._lora is None:
            self._lora = LoraManager(self.transformer)
        return self._lora.load(path, scale, name, fuse).name

    def set_lora_scales(self, scales=None, **named) -> None:
        """``pipe.set_lora_scales({"style": 0.8, "detail": 0.0})`` (or as keywords); 0 switches one off."""
        self._loras().set_scales({**(scales or {}), **named})

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (or all): layers and weights are as before it was loaded."""
        self._loras().unload(name)

    def fuse_lora(self, names=None) -> None:
        """Fuse the loaded LoRAs (or ``names``) into the weights."""
        self._loras().set_fused(True, names)

    def unfuse_lora(self, names=None) -> None:
        """Back to running the LoRAs beside the layers; the base weights are restored bit for bit."""
        self._loras().set_fused(False, names)

    @property
    def loras(self) -> dict[str, dict]:
        """name -> {"scale", "fused", "layers", "unmatched"} of every loaded LoRA."""
        if self._lora is None:
            return {}
        return {
            n: {"scale": a.scale, "fused": a.fused, "layers": len(a.targets), "unmatched": list(a.unmatched)}
            for n, a in self._lora.adapters.items()
        }

    def _loras(self):
        if self._lora is None or not self._lora.adapters:
            raise InputError("no LoRA is loaded: pipe.load_lora(path) first")
        return self._lora

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device="cuda"):
        """diffusers' memory switch for 12-24 GB GPUs: each component stays in CPU memory and moves
        to ``device`` (``cuda:gpu_id``) only while its stage runs (see
        :mod:`fastflow.pipelines.offload`). Returns the pipeline."""
        from ..ops.capability import usable_device
        from .offload import ModelOffload

        if gpu_id is not None:
            device = f"{torch.device(device).type}:{gpu_id}"
        device = torch.device(usable_device(device, "enable_model_cpu_offload", 'device="cpu"'))
        groups = {
            "text": list(text_models(self.text_encoder).values()),
            "transformer": [self.transformer],
            "vae": [self.vae],
        }
        self.disable_model_cpu_offload()
        self._offload = ModelOffload(groups, device)
        return self

    def disable_model_cpu_offload(self):
        """Turns the offload off; every component is left in CPU memory (then ``pipe.to(device)``)."""
        if self._offload is not None:
            self._offload.release()
        self._offload = None
        return self

    PROMPT_CACHE = 4  # prompt lists whose embeddings are kept (the negative "" of every CFG call, seed sweeps)

    def encode_text(self, prompts: list[str]):
        """The text encoder's output for ``prompts``, reusing the last few prompt lists' results.
        The cache key holds the prompts and every text-encoder parameter's identity, version,
        dtype and device, plus the encoders' lengths, so changed or moved weights never hit."""
        te = self.text_encoder
        models = text_models(te).values()
        state = tuple((id(p), p._version, p.dtype, p.device) for m in models for p in m.parameters())
        key = (tuple(prompts), getattr(te, "max_length", None), getattr(te, "t5_max_length", None), state)
        with self._prompt_lock:
            hit = self._prompt_cache.get(key)
            if hit is not None:
                self._prompt_cache.move_to_end(key)
                return hit
        with self.stage("text"):
            out = te(list(prompts))
        with self._prompt_lock:
            self._prompt_cache[key] = out
            while len(self._prompt_cache) > self.PROMPT_CACHE:
                self._prompt_cache.popitem(last=False)
        return out

    def pooled_embeds(self, prompt, embeds, pooled, what: str):
        """(sequence, pooled) embeddings of SD3 / SDXL: the given pair, or the text encoder's for
        ``prompt`` (through the prompt cache)."""
        if embeds is not None:
            if pooled is None:
                raise InputError(f"{what}_embeds needs pooled {what} embeddings too")
            return embeds, pooled
        if self.text_encoder is None:
            raise MissingComponentError(
                "this pipeline has no text encoders: pass prompt embeddings, or load the model with its text encoders"
            )
        return self.encode_text(as_prompt_list(prompt, what))

    def stage(self, name: str):
        """Context of a pipeline stage ("text", "transformer", "vae"): with model CPU offload on,
        that component group is on the execution device for the block."""
        return contextlib.nullcontext() if self._offload is None else self._offload.use(name)

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes: the transformer's device (with offload: the execution device)."""
        return self._offload.device if self._offload is not None else self.weights_device

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress_bar = not disable

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
        from ..models.modulation import precomputed_modulation

        if plan.conditioning is None:
            return contextlib.nullcontext()
        return precomputed_modulation(self.transformer, plan.conditioning, plan.conditioning_group)

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

    def sampling(self, num_inference_steps, sampler, sigmas=None) -> tuple[int, str]:
        if sigmas is not None and num_inference_steps is None:
            num_inference_steps = len(sigmas)
        steps = check_steps(self.defaults["steps"] if num_inference_steps is None else num_inference_steps)
        return steps, sampler or self.defaults["sampler"]

    @staticmethod
    def given_sigmas(sigmas, steps: int) -> torch.Tensor:
        """``sigmas=``: the sampling noise levels, used as given (no resolution shift), strictly
        decreasing in (0, 1], one per step; the final 0 is appended."""
        try:
            values = [float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
        except (TypeError, ValueError):
            raise InputError(f"sigmas must be a list of numbers, got {sigmas!r}") from None
        if len(values) != steps:
            raise InputError(f"got {len(values)} sigmas for {steps} steps: pass one per step (the final 0 is added)")
        decreasing = all(a > b for a, b in zip(values, values[1:], strict=False))
        ok = decreasing and all(math.isfinite(v) and 0 < v <= 1 for v in values)
        if not ok:
            raise InputError(f"sigmas must be strictly decreasing values in (0, 1], got {values}")
        return torch.tensor([*values, 0.0], dtype=torch.float32)

    def initial_noise(self, n: int, shape: tuple[int, ...], seed, generator, latents) -> tuple[torch.Tensor, list]:
        """[n, *shape] fp32 noise on the device from seeds / generators (``generator``: one
        torch.Generator or one per image), or the given ``latents``."""
        if latents is None:
            noise, seeds = draw_noise(n, shape, seed, generator)
        else:
            if tuple(latents.shape) != (n, *shape):
                raise InputError(f"latents must be {[n, *shape]}, got {list(latents.shape)}")
            noise, seeds = latents.float().cpu(), [None] * n
        return noise.to(self.device), seeds

    def image_size(self, r) -> tuple[int, int]:
        """Image-to-image: reads ``r.image`` (kept as the PIL image) and returns the default output
        (height, width): the image's, scaled down keeping its aspect to at most the model's
        trained area (a 4000 px photo on a 1024 px model gives about a megapixel), rounded down to
        the pipeline's multiple."""
        r.image = load_image(r.image)
        r.strength = 0.6 if r.strength is None else r.strength  # diffusers' Img2Img default
        h, w = r.image.height, r.image.width
        shrink = min(1.0, math.sqrt(self.default_size[0] * self.default_size[1] / (h * w)))
        m = self.multiple
        return max(m, int(h * shrink) // m * m), max(m, int(w * shrink) // m * m)

    def image_start(self, r, n: int, height: int, width: int, sigmas: torch.Tensor):
        """Image-to-image (diffusers' Img2Img pipelines): the start state [n, z, h, w] fp32, the
        sigmas still to run and the seeds. ``strength`` selects the first step as diffusers does
        (``t_start = int(steps - min(steps * strength, steps))``); the image is VAE-encoded by
        sampling its posterior and noised to that sigma: ``sigma * noise + (1 - sigma) * latent``.

        ``r.image`` is the PIL image :meth:`image_size` read. Randomness follows diffusers: per
        image, the posterior sample is drawn before the noise from that image's generator (a
        single ``generator`` draws one posterior sample for the batch); ``seed=`` gives each image
        the generator ``manual_seed(seed_i)``. ``latents`` replaces the noise (not the start state)."""
        strength = r.strength
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 < strength <= 1:
            raise InputError(f"strength must be a number in (0, 1], got {strength!r}")
        steps = len(sigmas) - 1
        t_start = int(max(steps - min(steps * strength, steps), 0))  # < steps: strength > 0 runs >= 1 step
        pixels = to_tensor(r.image, width, height).to(self.device)  # read by image_size
        generator = r.generator
        if generator is None:
            seeds = check_seeds(r.seed, n) or [random.randrange(2**63) for _ in range(n)]
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        else:
            seeds, gens = [None] * n, generator
        with self.stage("vae"):
            mean, std = self.vae.posterior(pixels)  # [1, z, h, w]
        draw = [gens] if isinstance(gens, torch.Generator) else gens
        eps = torch.cat([torch.randn(mean.shape, generator=g, dtype=torch.float32) for g in draw])
        latent = self.vae.scale(mean.float() + std.float() * eps.to(self.device)).expand(n, -1, -1, -1)
        noise, _ = self.initial_noise(n, tuple(latent.shape[1:]), None, gens, r.latents)
        sigma = float(sigmas[t_start])
        return sigma * noise + (1.0 - sigma) * latent, sigmas[t_start:], seeds

    def generate(
        self,
        output_type: str,
        callback,
        progress,
        cache=None,
        cache_threshold=None,
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        **request,
    ):
        """The template: checks -> ``prepare`` (subclass) -> denoise -> decode -> format.

        Runs under ``torch.inference_mode`` (no autograd bookkeeping: 10% of a small model's step on
        a CPU); tensor results are handed back as ordinary tensors, usable anywhere."""
        try:
            with torch.inference_mode():
                out = self._generate(output_type, callback, progress, cache, cache_threshold, callback_on_step_end,
                                     callback_on_step_end_tensor_inputs, request)  # fmt: skip
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
        unknown = sorted(set(tensor_inputs or ()) - {"latents"})
        if unknown:
            raise InputError(f"callback_on_step_end_tensor_inputs: only 'latents' is handed over, not {unknown}")

    def _generate(self, output_type, callback, progress, cache, cache_threshold, callback_on_step_end,
                  tensor_inputs, request):  # fmt: skip
        from ..caching import CacheRunner, CacheStats, adapter_for, resolve_policy

        timer = Timer()
        output_type = self.check_output_type(output_type)
        self.check_request(request, callback_on_step_end, tensor_inputs)
        if cache is None:
            cache = self.defaults.get("cache")  # fastflow.accelerate(pipe, cache=...)
        policy = resolve_policy(cache, cache_threshold, self.config)
        if policy is not None and adapter_for(self.transformer) is None:
            raise InputError(f"{type(self.transformer).__name__} has no block loop fastflow.caching can drive")
        plan = self.prepare(timer, SimpleNamespace(**request))
        plan.settings["cache"] = None if policy is None else policy.describe()
        stats = CacheStats()
        runner = None if policy is None else CacheRunner(policy, self.transformer, stats)
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
                with self._modulation(plan):
                    latent = plan.to_latent(loop.run(plan.velocity, plan.noise, plan.sigmas))
        finally:
            _ACTIVE_CACHE.reset(tokens[0])
            _ACTIVE_STATS.reset(tokens[1])
        stats = stats.as_dict()
        if output_type == "latent":
            return PipelineOutput(latent, plan.seeds, plan.settings, timer.done(), stats)
        with timer.stage("decode"), self.stage("vae"):
            pixels = self.vae.decode(latent)
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

    def on_images(self, images, output_type: str) -> None:
        """Called with the formatted images of each generation (FLUX Kontext keeps the last one)."""

    def base_settings(self, height: int, width: int, steps: int, guidance, sampler: str) -> dict:
        loras = {n: a.scale for n, a in self._lora.adapters.items()} if self._lora is not None else {}
        return {
            **({"loras": loras} if loras else {}),
            "model": self.config.name,
            "height": height,
            "width": width,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "sampler": sampler,
            "dtype": str(self.transformer.dtype).removeprefix("torch."),
        }

    @staticmethod
    def check_output_type(output_type: str) -> str:
        """One of OUTPUT_TYPES (any case, as diffusers accepts "PIL")."""
        normal = output_type.lower() if isinstance(output_type, str) else output_type
        if normal not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        return normal

    @staticmethod
    def format_images(images: torch.Tensor, output_type: str):
        """As diffusers: "pil" a list of images, "np" float32 [B, H, W, 3] in [0, 1], "pt" [B, 3, H, W]
        in [0, 1]."""
        if output_type == "pil":
            return to_pil(images)
        return to_numpy(images) if output_type == "np" else to_unit(images)
