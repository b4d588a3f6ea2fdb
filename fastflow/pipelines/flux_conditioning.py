"""FLUX.1 Fill and FLUX.1 Canny / Depth: what their img_in reads beside the noise, built as diffusers'
FluxFillPipeline and FluxControlPipeline build it.

- Fill (``config.conditioning == "fill"``, img_in 64 + 64 + 256 wide for FLUX.1): the image is the
  image-to-image start (strength 1.0 by default: pure noise); the mask (white: repaint, black: keep)
  is resized to the output, made grayscale and binarized at 0.5; the masked image ``image * (1 -
  mask)`` is VAE-encoded (a posterior sample, drawn after the noise) and packed 2x2 (64 channels);
  the mask's f x f pixel cells (f: the VAE's downscale, 8) become f^2 channels, packed 2x2 (256).
- Control (``"control"``, img_in 64 + 64): the control image (canny edges, a depth map) resized to
  the output, VAE-encoded (a posterior sample, drawn before the noise), packed; no per-step blending.

Both are concatenated to the packed noise on the channel axis at every step (:func:`with_condition`).
Randomness follows diffusers: one ``generator`` draws for the whole batch as diffusers does; seeds
(and generator lists) give each image its own generator, so an image depends on its seed alone.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch

from ..errors import InputError
from ..models.flux import pack_latents
from . import masks
from .images import load_image, to_tensor
from .noise import check_generators, check_seeds


def check_request(pipe, r) -> None:
    """Typed errors before any work: a Fill model needs ``image`` and ``mask_image`` (read here: a
    mask of the image's size), a Control model ``control_image``; no other FLUX model takes either.
    Fill's strength defaults to 1.0."""
    config = pipe.config
    kind, name = config.conditioning, config.name
    if kind is None:
        if r.control_image is not None:
            raise InputError(
                f"{name} takes no control_image: load a FLUX.1 Canny or Depth model (flux-canny-dev, flux-depth-dev)"
            )
        return  # mask_image on dev / schnell: inpainting (pipelines/masks.py)
    if kind == "fill":
        if r.control_image is not None:
            raise InputError(f"{name} is a FLUX.1 Fill model: pass image= and mask_image=, not control_image=")
        if r.image is None or r.mask_image is None:
            raise InputError(
                f"{name} (FLUX.1 Fill) needs image= and mask_image= (white: repaint, black: keep); "
                "to outpaint, pad the image and mask the padding white"
            )
        f = pipe.vae.downscale
        if config.in_channels - 2 * config.out_channels != 4 * f * f:
            raise InputError(
                f"{name}'s img_in reads {config.in_channels - 2 * config.out_channels} mask channels but this "
                f"VAE (downscale {f}) gives {4 * f * f}: load the Fill model with its own VAE"
            )
        if r.padding_mask_crop is not None:
            raise InputError(f"{name} (FLUX.1 Fill) takes no padding_mask_crop (diffusers' FluxFillPipeline has none)")
        r.image = load_image(r.image)
        r.mask_image = load_mask(r.mask_image, r.image.size)
        r.strength = 1.0 if r.strength is None else r.strength  # diffusers' FluxFillPipeline default
        return
    if r.control_image is None:
        raise InputError(
            f"{name} (FLUX.1 Canny / Depth) needs control_image=: canny edges (fastflow.canny(image)) "
            "or a depth map (e.g. Depth Anything through transformers)"
        )
    if r.image is not None or r.mask_image is not None:
        raise InputError(f"{name} takes control_image= only: image-to-image and inpainting with it are not supported")


def control_size(pipe, r) -> tuple[int, int]:
    """A Control model's default (height, width): the control image's, as image-to-image's rule."""
    r.control_image = load_image(r.control_image)
    return pipe.image_size(SimpleNamespace(image=r.control_image, strength=None))


def load_mask(mask, size: tuple[int, int]):
    """The mask as a PIL image of ``size`` (the input image's (width, height)), read as inpainting
    reads masks (:func:`.masks.load_mask`: a path, a PIL image or a uint8 / bool array, any mode
    Pillow makes grayscale); Fill's own rule is the exact size."""
    mask = masks.load_mask(mask)
    if mask.size != size:
        raise InputError(
            f"mask_image is {mask.size[0]}x{mask.size[1]} but image is {size[0]}x{size[1]}: "
            "pass a mask of the image's size"
        )
    return mask


def mask_tensor(mask, width: int, height: int) -> torch.Tensor:
    """[1, 1, height, width] of 0 / 1: resized in its own mode (LANCZOS), grayscale, >= 0.5 -> 1
    (diffusers' mask processor)."""
    from PIL import Image

    gray = mask.resize((width, height), resample=Image.LANCZOS).convert("L")
    values = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None, None]
    return (values >= 0.5).float()


def pack_mask(mask: torch.Tensor, f: int) -> torch.Tensor:
    """[B, 1, H, W] pixel mask -> [B, N, 4 f^2]: each f x f cell of a latent pixel as f^2 channels
    (row-major within the cell), then packed 2x2 like the latents."""
    b, _, height, width = mask.shape
    h, w = height // f, width // f
    cells = mask[:, 0].reshape(b, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(b, f * f, h, w)
    return pack_latents(cells)


def _generators(r, n: int):
    """One generator for the batch (``generator=``), or one per image (a list, or from the seeds)."""
    if r.generator is not None:
        return check_generators(r.generator, n)
    seeds = check_seeds(r.seed, n) or [random.randrange(2**63) for _ in range(n)]
    r.seed = seeds  # the noise is then drawn from the same per-image generators' next values
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _sample(pipe, pixels: torch.Tensor, gens, rows: int) -> torch.Tensor:
    """Scaled posterior samples [rows, z, h, w] of ``pixels`` [1, 3, H, W]: one draw of ``rows``
    from a single generator, or one row from each of a list."""
    with pipe.stage("vae"):
        mean, std = pipe.vae.posterior(pixels.to(pipe.device))
    shape = tuple(mean.shape[1:])
    if isinstance(gens, torch.Generator):
        eps = torch.randn((rows, *shape), generator=gens, dtype=torch.float32)
    else:
        eps = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens[:rows]])
    return pipe.vae.scale(mean.float() + std.float() * eps.to(pipe.device))


def control_start(pipe, r, n: int, height: int, width: int, shape: tuple[int, ...]):
    """Control: (noise [n, *shape], seeds, packed control latents [n, N, 64]). The control sample is
    drawn first, then the noise, from the same generator(s) (diffusers' order)."""
    gens = _generators(r, n)
    seeds = list(r.seed) if r.generator is None else [None] * n
    latents = _sample(pipe, to_tensor(r.control_image, width, height), gens, n)
    noise, _ = pipe.initial_noise(n, shape, None, gens, r.latents)
    return noise, seeds, pack_latents(latents)


def fill_generators(r, n: int):
    """Fill, before the image-to-image start: the seeds become per-image generators (kept in
    ``r.generator``) so that the masked image's sample follows the start's draws."""
    if r.generator is None:
        r.generator = _generators(r, n)
        return list(r.seed)
    return None


def fill_condition(pipe, r, n: int, height: int, width: int) -> torch.Tensor:
    """Fill, after the image-to-image start (its draws made): [n, N, 64 + 4 f^2] = the masked image's
    packed latents and the packed mask. One ``generator`` draws one sample for the batch (diffusers);
    per-image generators (seeds, lists) one each."""
    mask = mask_tensor(r.mask_image, width, height)  # read by check_request
    f = pipe.vae.downscale
    masked = to_tensor(r.image, width, height) * (1.0 - mask)
    single = isinstance(r.generator, torch.Generator)
    latents = pack_latents(_sample(pipe, masked, r.generator, 1 if single else n)).expand(n, -1, -1)
    return torch.cat((latents, pack_mask(mask, f).to(latents.device).expand(n, -1, -1)), dim=2)


def with_condition(x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """The transformer's img input: the packed state [B, N, 64] and the condition [n, N, C]
    (repeated over the CFG branches) concatenated on the channel axis."""
    if cond is None:
        return x
    return torch.cat((x, cond.repeat(x.shape[0] // cond.shape[0], 1, 1).to(x.dtype)), dim=2)
