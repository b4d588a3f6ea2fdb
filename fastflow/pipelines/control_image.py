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
from .images import to_tensor


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


def check_sdxl(control, r) -> None:
    """SDXL inpainting with ControlNets (StableDiffusionXLControlNetInpaintPipeline), before any
    work: diffusers preprocesses the control image at its own size unless height and width are
    given, and crops it with the mask's box under ``padding_mask_crop``, so a control image (PIL)
    must then have the init image's size; a tensor control image cannot be cropped."""
    if not control.nets or r.mask_image is None:
        return
    for image in control.images:
        if isinstance(image, torch.Tensor):
            if r.padding_mask_crop is not None:
                raise InputError("padding_mask_crop crops the control image too: pass control_image as a PIL "
                                 "image or path, not a tensor")  # fmt: skip
            continue
        if (r.padding_mask_crop is not None or r.height is None or r.width is None) and image.size != r.image.size:
            (cw, ch), (iw, ih) = image.size, r.image.size
            raise InputError(f"control_image is {cw}x{ch}, the image {iw}x{ih}: SDXL inpainting with a ControlNet "
                             "needs a control image of the image's size (or height= and width=, without "
                             "padding_mask_crop)")  # fmt: skip


def crop_sdxl(control, r, height: int, width: int) -> None:
    """``padding_mask_crop``: each control image cropped to the mask's box and fill-resized to the
    output, as the init image (diffusers' prepare_control_image with crops_coords)."""
    if not control.nets or r.mask_image is None or r.padding_mask_crop is None:
        return
    box = masks.crop_region(r.mask_image, width, height, r.padding_mask_crop)
    control.images = [masks._resize(image.crop(box), width, height, "fill") for image in control.images]
