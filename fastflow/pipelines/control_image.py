"""ControlNets together with image-to-image and inpainting, as diffusers'
FluxControlNetImg2ImgPipeline / FluxControlNetInpaintPipeline: the control image is resized to
the output size (the whole control image, not the ``padding_mask_crop`` crop, as diffusers) and
VAE-encoded from the call's generator(s) first, one posterior sample per ControlNet in order; then
the same generator(s) draw the init image's posterior sample and the noise, as the plain
image-to-image / inpainting paths do. The keep window (``control_guidance_start`` / ``_end``)
counts over the steps that run: step i of the n = len(shortened schedule) steps ``strength``
leaves, as diffusers' ``controlnet_keep`` over the shortened timesteps.
"""

from __future__ import annotations

import torch

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
