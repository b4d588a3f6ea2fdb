"""Inpainting, shared by FLUX, SD3 and SDXL: masks in (``mask_image``), the image and mask
preprocessing of diffusers' inpaint pipelines (VaeImageProcessor with ``do_binarize`` and
``do_convert_grayscale``, ``padding_mask_crop``'s crop, fill-resize and paste-back), the start
state, the masked-image latents of inpainting UNets, and the per-step blending of the known region
(the image latents noised to the next sigma, the mask choosing).

White mask pixels (>= 0.5 after the resize) are repainted, black ones kept, as in diffusers."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .images import load_image
from .noise import check_generators, check_seeds

# PIL modes resized as they are, then made grayscale (diffusers' order); others become grayscale first
MODES = ("1", "L", "P", "I", "F", "I;16", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "HSV")
ASPECT_TOLERANCE = 0.02  # a mask of another size must keep the image's aspect ratio (it is resized)


def load_mask(mask):
    """A PIL image (its own mode; diffusers resizes first and converts to grayscale after) from a
    path, a PIL image or a uint8 / bool array (HxW, or HxWx1 / 3 / 4); EXIF rotation applied."""
    from PIL import Image, ImageOps

    if isinstance(mask, (str, Path)):
        path = Path(mask)
        if not path.is_file():
            raise InputError(f"mask image {path} not found")
        try:
            mask = Image.open(path)
            mask.load()
        except OSError as e:
            raise InputError(f"{path} is not an image Pillow can read ({e})") from None
    elif isinstance(mask, np.ndarray):
        if mask.dtype == np.bool_:
            mask = mask.astype(np.uint8) * 255
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.dtype != np.uint8 or not (mask.ndim == 2 or (mask.ndim == 3 and mask.shape[-1] in (3, 4))):
            raise InputError(f"mask arrays must be HxW (or HxWx1 / 3 / 4) uint8 or bool, got {mask.shape} {mask.dtype}")
        mask = Image.fromarray(mask)
    if not isinstance(mask, Image.Image):
        raise InputError(f"mask_image must be a path, PIL image or uint8 / bool array, got {type(mask).__name__}")
    mask = ImageOps.exif_transpose(mask)
    if mask.mode not in MODES:
        try:
            mask = mask.convert("L")
        except (ValueError, OSError) as e:
            raise InputError(f"a mask image in mode {mask.mode} cannot be read as grayscale ({e})") from None
    return mask


def check_request(r, family: str) -> None:
    """The inpainting arguments, before any work: ``mask_image`` needs ``image``, masks are images
    of the image's aspect ratio (resized to the output size, as diffusers does), ``padding_mask_crop``
    a non-negative int with PIL image and mask of one size, PIL output and some white in the mask.
    Replaces ``r.mask_image`` with the loaded mask and ``r.image`` with the loaded RGB image."""
    from PIL import Image

    if r.mask_image is None:
        if r.padding_mask_crop is not None:
            raise InputError("padding_mask_crop needs mask_image= (and image=)")
        return
    if r.image is None:
        raise InputError(f"mask_image needs image= (the image to inpaint) for {family}")
    if r.strength is not None:
        start_steps(r.strength, 1)  # its range, before any work
    pad = r.padding_mask_crop
    if pad is not None:
        if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
            raise InputError(f"padding_mask_crop must be an integer >= 0 (pixels), got {pad!r}")
        for name in ("image", "mask_image"):
            if not isinstance(getattr(r, name), Image.Image):
                raise InputError(f"padding_mask_crop needs {name} as a PIL image (as in diffusers), "
                                 f"got {type(getattr(r, name)).__name__}")  # fmt: skip
    r.mask_image = load_mask(r.mask_image)
    image = load_image(r.image)
    (iw, ih), (mw, mh) = image.size, r.mask_image.size
    if pad is not None and (iw, ih) != (mw, mh):
        raise InputError(f"padding_mask_crop needs a mask of the image's size {iw}x{ih}, got {mw}x{mh}")
    if abs((mw / mh) / (iw / ih) - 1) > ASPECT_TOLERANCE:
        raise InputError(f"the mask ({mw}x{mh}) does not have the image's aspect ratio ({iw}x{ih}): "
                         "pass a mask of the image's size")  # fmt: skip
    if pad is not None and not np.asarray(r.mask_image.convert("L")).any():
        raise InputError("padding_mask_crop needs a mask with some white (repainted) pixels")
    r.image = image


def crop_region(mask, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box around the mask's non-black pixels, ``pad`` pixels wider, then
    grown to the (width / height) aspect ratio inside the image: diffusers' get_crop_region."""
    m = np.asarray(mask.convert("L"))
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        grow = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = _grow(y1 - grow // 2, y2 + grow - grow // 2, h)
    else:
        grow = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = _grow(x1 - grow // 2, x2 + grow - grow // 2, w)
    return x1, y1, x2, y2


def _grow(a: int, b: int, size: int) -> tuple[int, int]:
    if b >= size:
        a, b = a - (b - size), size
    if a < 0:
        a, b = 0, b - a
    return a, min(b, size)


def _resize(image, width: int, height: int, mode: str):
    """diffusers' VaeImageProcessor.resize for PIL images: "default" (stretch), "fill" (fit, the
    borders filled with the edge rows / columns stretched) or "crop" (cover, centred)."""
    from PIL import Image

    if mode == "default":
        return image.resize((width, height), resample=Image.LANCZOS)
    ratio, src = width / height, image.width / image.height
    if mode == "crop":
        src_w = width if ratio > src else image.width * height // image.height
        src_h = height if ratio <= src else image.height * width // image.width
    else:
        src_w = width if ratio < src else image.width * height // image.height
        src_h = height if ratio >= src else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "fill" and ratio < src and height // 2 - src_h // 2 > 0:
        fill = height // 2 - src_h // 2
        out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, fill), box=(0, src_h, width, src_h)), box=(0, fill + src_h))
    elif mode == "fill" and ratio > src and width // 2 - src_w // 2 > 0:
        fill = width // 2 - src_w // 2
        out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((fill, height), box=(src_w, 0, src_w, height)), box=(fill + src_w, 0))
    return out


def pixels_and_mask(r, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [1, 3, H, W] in [-1, 1], mask [1, 1, H, W] of 0 / 1), as diffusers preprocesses them:
    with ``padding_mask_crop`` both are cropped to :func:`crop_region` and fill-resized, else
    stretched to (height, width); the mask is resized, made grayscale, then binarized at 0.5."""
    image, mask, crop = r.image, r.mask_image, None
    if r.padding_mask_crop is not None:
        crop = crop_region(mask, width, height, r.padding_mask_crop)
        image, mask = image.crop(crop), mask.crop(crop)
    mode = "default" if crop is None else "fill"
    image = np.asarray(_resize(image, width, height, mode), dtype=np.float32) / 255.0
    mask = np.asarray(_resize(mask, width, height, mode).convert("L"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(2.0 * image - 1.0).permute(2, 0, 1)[None]
    return pixels, torch.from_numpy((mask >= 0.5).astype(np.float32))[None, None]


def paste_back(images: list, r, height: int, width: int) -> list:
    """``padding_mask_crop``: each generated image resized into the crop box of the original image,
    whose unmasked pixels are laid over it (diffusers' VaeImageProcessor.apply_overlay)."""
    from PIL import Image, ImageOps

    original, mask = load_image(r["image"]), load_mask(r["mask_image"])
    x1, y1, x2, y2 = crop_region(mask, width, height, r["padding_mask_crop"])
    kept = Image.new("RGBa", original.size)
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBA")
    out = []
    for image in images:
        base = Image.new("RGBA", original.size)
        base.paste(_resize(image, x2 - x1, y2 - y1, "crop"), (x1, y1))
        image = base.convert("RGB").convert("RGBA")
        image.alpha_composite(kept)
        out.append(image.convert("RGB"))
    return out


def generate(pipe, request: dict):
    """A family's ``__call__`` body: ``pipe.generate``, then, with ``padding_mask_crop``, the
    paste-back of each image into the original (the size of the caller's image)."""
    if request.get("mask_image") is None or request.get("padding_mask_crop") is None:
        return pipe.generate(**request)
    if request.get("output_type", "pil") != "pil":
        raise InputError(f"padding_mask_crop pastes the result back into the image: output_type must "
                         f"be 'pil', got {request['output_type']!r}")  # fmt: skip
    return_dict = request.pop("return_dict", True)
    out = pipe.generate(**request, return_dict=True)
    out.images = paste_back(out.images, request, out.settings["height"], out.settings["width"])
    return out if return_dict else out.to_tuple()


def start_steps(strength, steps: int, discrete: bool = False) -> int:
    """The first step to run: diffusers' ``int(steps - min(steps * strength, steps))`` (flow
    models) or ``steps - min(int(steps * strength), steps)`` (SDXL); at least one step must run."""
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 < strength <= 1:
        raise InputError(f"strength must be a number in (0, 1], got {strength!r}")
    if discrete:
        t_start = steps - min(int(steps * strength), steps)
    else:
        t_start = int(max(steps - min(steps * strength, steps), 0))
    if t_start >= steps:
        raise InputError(f"strength {strength} with {steps} steps runs no step: raise strength or the steps")
    return t_start


@dataclass
class Inpainting:
    """What the loop needs: the image latents, the start noise and the latent mask (1: repaint) in
    the state's layout, and how a latent is noised to a sigma. ``masked`` (inpainting UNets): the
    model's extra input channels, mask and masked-image latents [n, 1 + z, h, w]."""

    latent: torch.Tensor | None
    noise: torch.Tensor
    mask: torch.Tensor
    noised: object
    masked: torch.Tensor | None = None

    def blend(self, x: torch.Tensor, sigma_next: float) -> torch.Tensor:
        """diffusers' step end: the known region is the image latent noised to the next sigma
        (the latent itself after the last step, sigma 0)."""
        known = self.noised(self.latent, self.noise, sigma_next)
        return (1 - self.mask) * known + self.mask * x

    def solver(self, solver):
        """``solver`` (a callable of (velocity, x, sigmas, callback)) blending after every step,
        before the user's callbacks (diffusers' order)."""

        def run(velocity, x, sigmas, callback=None):
            def after(i, x, sigma_next):
                x = self.blend(x, sigma_next)
                out = None if callback is None else callback(i, x, sigma_next)
                return x if out is None else out

            return solver(velocity, x, sigmas, callback=after)

        return run


def flow_noised(latent, noise, sigma):
    """FLUX / SD3 (FlowMatchEulerDiscreteScheduler.scale_noise)."""
    return sigma * noise + (1.0 - sigma) * latent


def discrete_noised(latent, noise, sigma):
    """SDXL (EulerDiscreteScheduler.add_noise)."""
    return latent + noise * sigma


def _draw(pipe, pixels: torch.Tensor, gens) -> torch.Tensor:
    """The VAE posterior sample of ``pixels`` [1, 3, H, W], scaled: one per generator of a list,
    one for the batch from a single generator (drawn on the CPU, as the noise)."""
    with pipe.stage("vae"):
        mean, std = pipe.vae.posterior(pixels.to(pipe.device))
    draw = [gens] if isinstance(gens, torch.Generator) else gens
    eps = torch.cat([torch.randn(mean.shape, generator=g, dtype=torch.float32) for g in draw])
    return pipe.vae.scale(mean.float() + std.float() * eps.to(pipe.device))


def inpaint_start(pipe, r, n: int, height: int, width: int, noised, encode_image=True, masked_channels=False):
    """(pixels-derived :class:`Inpainting`, seeds) with diffusers' randomness: per generator, the
    image's posterior sample (when ``encode_image``), then the noise, then (``masked_channels``:
    SDXL, which always draws it) the masked image's posterior sample. ``seed=`` gives each image
    ``manual_seed(seed_i)``; a generator list gives each image its own draws (diffusers' inpaint
    pipelines draw the posterior from the first generator only); ``latents`` replaces the noise."""
    pixels, mask = pixels_and_mask(r, height, width)
    if r.generator is None:
        seeds = check_seeds(r.seed, n) or [random.randrange(2**63) for _ in range(n)]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    else:
        seeds, gens = [None] * n, check_generators(r.generator, n)
    latent = _draw(pipe, pixels, gens).expand(n, -1, -1, -1) if encode_image else None
    f = pipe.vae.downscale
    shape = (pipe.vae.config.z_channels, height // f, width // f)
    noise, _ = pipe.initial_noise(n, shape, None, gens, r.latents)
    masked = _draw(pipe, pixels * (mask < 0.5), gens).expand(n, -1, -1, -1) if masked_channels else None
    small = torch.nn.functional.interpolate(mask, size=shape[1:]).to(pipe.device)  # nearest, as diffusers
    if masked is not None:
        masked = torch.cat((small.expand(n, -1, -1, -1), masked), 1)
    return Inpainting(latent, noise, small, noised, masked), seeds


def flow_start(pipe, r, n: int, height: int, width: int, sigmas: torch.Tensor, pack=None):
    """FLUX / SD3 (FluxInpaintPipeline, StableDiffusion3InpaintPipeline, 16-channel models): the
    start state (the image latent noised to the first sigma ``strength`` selects), the sigmas still
    to run, the seeds and the :class:`Inpainting` in the state's layout (``pack``: FLUX's tokens)."""
    t_start = start_steps(r.strength, len(sigmas) - 1)
    inp, seeds = inpaint_start(pipe, r, n, height, width, flow_noised)
    x = flow_noised(inp.latent, inp.noise, float(sigmas[t_start]))
    if pack is not None:
        mask = inp.mask.expand_as(inp.noise)
        inp = Inpainting(pack(inp.latent), pack(inp.noise), pack(mask), flow_noised)
    return x, sigmas[t_start:], seeds, inp


def sdxl_start(pipe, r, n: int, height: int, width: int, sigmas, timesteps, noise_scale: float):
    """SDXL (StableDiffusionXLInpaintPipeline): the start state, sigmas and timesteps still to run,
    seeds and :class:`Inpainting`. A 4-channel UNet blends the known region after every step; an
    inpainting UNet (9 channels) takes mask and masked-image latents as extra input channels and
    does not blend. strength 1 starts from noise * ``noise_scale`` (init_noise_sigma)."""
    t_start = start_steps(r.strength, len(sigmas) - 1, discrete=True)
    unet9, top = pipe.transformer.config.in_channels != pipe.vae.config.z_channels, r.strength == 1.0
    inp, seeds = inpaint_start(pipe, r, n, height, width, discrete_noised, not (unet9 and top), True)
    x = inp.noise * noise_scale if top else discrete_noised(inp.latent, inp.noise, float(sigmas[t_start]))
    if not unet9:
        inp.masked = None
    return x, sigmas[t_start:], timesteps[t_start:], seeds, inp


def attach(plan, inp: Inpainting | None, r):
    """The plan of an inpainting call: its solver blends (unless the model takes the mask itself),
    its settings say so."""
    if inp is None:
        return plan
    from ..samplers import get_solver

    if inp.masked is None:
        plan.solver = inp.solver(plan.solver or get_solver(plan.sampler))
    plan.settings.update(inpaint=True, strength=r.strength, padding_mask_crop=r.padding_mask_crop)
    return plan
