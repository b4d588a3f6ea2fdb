"""ControlNets together with image-to-image and inpainting, as diffusers'
FluxControlNetImg2ImgPipeline / FluxControlNetInpaintPipeline and
StableDiffusionXLControlNetInpaintPipeline.

FLUX: the control image is resized to the output size (the whole control image, not the
``padding_mask_crop`` crop, as diffusers) and VAE-encoded from the call's generator(s) first, one
posterior sample per ControlNet in order; then the same generator(s) draw the init image's
posterior sample and the noise, as the plain image-to-image / inpainting paths do. The keep
window (``control_guidance_start`` / ``_end``) counts over the steps that run: step i of the
n = len(shortened schedule) steps ``strength`` leaves, as diffusers' ``controlnet_keep`` over the
shortened timesteps (SDXL too).

SDXL inpainting: the control image (no randomness) is cropped and fill-resized as the init image
under ``padding_mask_crop``; the inpainting path is the plain one (4-channel UNets blend, 9-channel
UNets take mask and masked-image latents), and the ControlNets see the 4 latent channels only.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..models.flux import pack_latents
from . import masks
from .images import load_image, to_tensor


def flux_start(pipe, control, r, n: int, height: int, width: int, sigmas: torch.Tensor):
    """FLUX (dev / schnell) with ControlNets and ``image=`` (and ``mask_image=``): (start state
    [n, 16, h, w], sigmas still to run, seeds, :class:`masks.Inpainting` or None). Fills
    ``control.inputs`` with the packed control latents."""
    from .flux_conditioning import _generators, _sample

    control.n = n
    control.check_size(height, width)
    gens = _generators(r, n)  # a seed list becomes one generator per image (r.seed set to the seeds)
    seeds = list(r.seed) if r.generator is None else [None] * n
    for net, image in zip(control.nets, control.images, strict=True):
        pixels = image * 2.0 - 1.0 if isinstance(image, torch.Tensor) else to_tensor(image, width, height)
        latents = pack_latents(_sample(pipe, pixels, gens, n))
        control.inputs.append(latents.to(pipe.device, net.dtype).expand(n, -1, -1))
    r.generator = gens  # the image's posterior and the noise continue the same generators
    if r.mask_image is None:
        x, sigmas, _ = pipe.image_start(r, n, height, width, sigmas)
        return x, sigmas, seeds, None
    x, sigmas, _, inpaint = masks.flow_start(pipe, r, n, height, width, sigmas, pack_latents)
    return x, sigmas, seeds, inpaint


def check_sdxl_image(r, sampler: str, default_strength: float) -> None:
    """SDXL image-to-image's own checks (with or without ControlNets): the image read, ``strength``
    (diffusers' default for the pipeline: 0.3 alone, 0.8 with ControlNets) in (0, 1], Euler samplers."""
    r.image = load_image(r.image)
    r.strength = default_strength if r.strength is None else r.strength
    masks.start_steps(r.strength, 1)  # its range
    if sampler == "dpmpp_2m":
        raise InputError("SDXL image-to-image runs the euler or euler_ancestral sampler, not dpmpp_2m")


def check_sdxl(control, r, sampler: str) -> None:
    """SDXL image-to-image and inpainting with ControlNets (StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline), before any work: diffusers preprocesses the control
    image at its own size unless height and width are given, and crops it with the mask's box under
    ``padding_mask_crop``, so a control image (PIL) must then have the init image's size; a tensor
    control image cannot be cropped. Image-to-image: strength (default 0.8, diffusers') in (0, 1],
    the euler or euler_ancestral sampler. Reads ``r.image``."""
    if not control.nets:
        return
    if r.image is None:
        if r.strength is not None:
            raise InputError("strength needs an input image (image=)")
        return
    if r.mask_image is None:
        check_sdxl_image(r, sampler, default_strength=0.8)
    crop = r.mask_image is not None and r.padding_mask_crop is not None
    for image in control.images:
        if isinstance(image, torch.Tensor):
            if crop:
                raise InputError("padding_mask_crop crops the control image too: pass control_image as a PIL "
                                 "image or path, not a tensor")  # fmt: skip
            continue
        if (crop or r.height is None or r.width is None) and image.size != r.image.size:
            (cw, ch), (iw, ih) = image.size, r.image.size
            raise InputError(f"control_image is {cw}x{ch}, the image {iw}x{ih}: SDXL image-to-image / inpainting "
                             "with a ControlNet needs a control image of the image's size (or height= and "
                             "width=, without padding_mask_crop)")  # fmt: skip


def crop_sdxl(control, r, height: int, width: int) -> None:
    """``padding_mask_crop``: each control image cropped to the mask's box and fill-resized to the
    output, as the init image (diffusers' prepare_control_image with crops_coords)."""
    if not control.nets or r.mask_image is None or r.padding_mask_crop is None:
        return
    box = masks.crop_region(r.mask_image, width, height, r.padding_mask_crop)
    control.images = [masks._resize(image.crop(box), width, height, "fill") for image in control.images]


def sdxl_image_start(pipe, r, n: int, height: int, width: int, sigmas, timesteps):
    """SDXL image-to-image (alone or with ControlNets): (start state, sigmas, timesteps still to run). The first
    step is diffusers' ``steps - min(int(steps * strength), steps)``; the image's posterior sample
    and then the noise come from ``r.generator`` (a generator, or one per image); the start is the
    image latent noised to that step's sigma (EulerDiscreteScheduler.add_noise, also at strength 1).
    ``latents`` replaces the noise (fastflow's image-to-image convention)."""
    t_start = masks.start_steps(r.strength, len(sigmas) - 1, discrete=True)
    latent = masks._draw(pipe, to_tensor(r.image, width, height), r.generator).expand(n, -1, -1, -1)
    f = pipe.vae.downscale
    shape = (pipe.vae.config.z_channels, height // f, width // f)
    noise, _ = pipe.initial_noise(n, shape, None, r.generator, r.latents)
    x = masks.discrete_noised(latent, noise, float(sigmas[t_start]))
    return x, sigmas[t_start:], timesteps[t_start:]
