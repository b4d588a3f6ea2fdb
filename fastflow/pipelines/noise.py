"""Seeds and the start state: per-image seeded noise (an image depends on its seed alone, not on
the batch or the device), given latents, and image-to-image's noised VAE latent."""

from __future__ import annotations

import math
import random

import torch

from ..errors import InputError
from .images import load_image, to_tensor
from .settings import is_int

SEED_LIMIT = 2**64  # torch.Generator seeds are unsigned 64-bit


def check_seeds(seed, n: int) -> list[int] | None:
    """n seeds from ``seed`` (an int: seed, seed + 1, ...; a list: one per image; None or -1:
    random), each in [0, 2**64)."""
    if seed is None or (is_int(seed) and seed == -1):
        return None
    seeds = list(seed) if isinstance(seed, (list, tuple)) else None
    if seeds is None:
        if not is_int(seed):
            raise InputError(f"seed must be an integer (or -1 for random), got {seed!r}")
        seeds = [seed + i for i in range(n)]
    elif len(seeds) != n:
        raise InputError(f"got {len(seeds)} seeds for {n} images")
    bad = [s for s in seeds if not is_int(s) or not 0 <= s < SEED_LIMIT]
    if bad:
        raise InputError(f"seeds must be integers in [0, 2**64) (-1: random), got {bad[0]!r}")
    return seeds


def check_generators(generator, n: int):
    """``generator`` unchanged: one torch.Generator, or a list of one per image."""
    if isinstance(generator, list) and len(generator) != n:
        raise InputError(f"got {len(generator)} generators for {n} images: pass one per image, or a single one")
    return generator


def draw_noise(n: int, shape: tuple[int, ...], seed, generator) -> tuple[torch.Tensor, list[int | None]]:
    """n noise tensors of ``shape`` on the CPU in fp32, one seed each (seed, seed + 1, ...; random
    seeds when none is given), so an image depends on its seed only, not on batch size or device."""
    if generator is not None:
        check_generators(generator, n)
        gens = generator if isinstance(generator, list) else [generator] * n
        return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]), [None] * n
    base = check_seeds(seed, n) or [random.randrange(2**63) for _ in range(n)]
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in base]
    return torch.stack(noise), base


class NoiseMixin:
    """The start state of a pipeline's denoising loop, on its device (``self.device``); image-to-
    image encodes with ``self.vae`` in the "vae" stage."""

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
            seeds, gens = [None] * n, check_generators(generator, n)  # before the VAE runs
        with self.stage("vae"):
            mean, std = self.vae.posterior(pixels)  # [1, z, h, w]
        draw = [gens] if isinstance(gens, torch.Generator) else gens
        eps = torch.cat([torch.randn(mean.shape, generator=g, dtype=torch.float32) for g in draw])
        latent = self.vae.scale(mean.float() + std.float() * eps.to(self.device)).expand(n, -1, -1, -1)
        noise, _ = self.initial_noise(n, tuple(latent.shape[1:]), None, gens, r.latents)
        sigma = float(sigmas[t_start])
        return sigma * noise + (1.0 - sigma) * latent, sigmas[t_start:], seeds
