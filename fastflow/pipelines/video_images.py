"""Stable Video Diffusion's image conditioning through CLIP, as diffusers'
``StableVideoDiffusionPipeline._encode_image`` computes it (pure torch).

The CLIP image encoder sees the conditioning image at its ORIGINAL size, shrunk (or grown) to
224x224 without keeping the aspect ratio and without a crop, by an antialiased resize: a separable
Gaussian blur whose sigma follows the scale factor (skimage's rule), then bicubic interpolation with
``align_corners=True`` (kornia's ``resize(..., antialias=True)``, which sgm calls and diffusers
copies as ``_resize_with_antialiasing``). The resize runs on the image mapped to [-1, 1], as the
reference does, and maps back to [0, 1]; then CLIP's mean / std normalisation. The embeddings are
``image_embeds`` as [B, 1, projection] (one context token per image).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .images import load_image

# OpenAI CLIP's normalisation: SVD's feature_extractor/preprocessor_config.json, and sgm's constants.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def antialias_sigma(in_size: int, out_size: int) -> float:
    """The blur sigma for scaling ``in_size`` -> ``out_size`` pixels: (factor - 1) / 2, at least 0.001
    (a blur of no effect when enlarging)."""
    return max((in_size / out_size - 1.0) / 2.0, 0.001)


def antialias_kernel_size(sigma: float) -> int:
    """Two sigmas each side (at least 3 taps), rounded up to an odd number."""
    size = int(max(4.0 * sigma, 3))
    return size + 1 if size % 2 == 0 else size


def gaussian_window(size: int, sigma: float, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A normalised 1-D Gaussian of ``size`` taps centred on ``size // 2`` (half a tap to the right
    for an even size), computed in ``dtype``."""
    taps = torch.arange(size, dtype=dtype, device=device) - size // 2
    if size % 2 == 0:
        taps = taps + 0.5
    s = torch.tensor(sigma, dtype=dtype, device=device)
    window = torch.exp(-(taps**2) / (2 * s**2))
    return window / window.sum()


def _blur_along(x: torch.Tensor, window: torch.Tensor, dim: int) -> torch.Tensor:
    """Depthwise convolution of [B, C, H, W] with ``window`` along H (dim 2) or W (dim 3), the borders
    reflected (the extra tap of an even window on the far side)."""
    k, channels = window.numel(), x.shape[1]
    near = (k - 1) // 2
    far = k - 1 - near
    if dim == 3:
        x = F.pad(x, (near, far, 0, 0), mode="reflect")
        weight = window.view(1, 1, 1, k)
    else:
        x = F.pad(x, (0, 0, near, far), mode="reflect")
        weight = window.view(1, 1, k, 1)
    return F.conv2d(x, weight.expand(channels, 1, *weight.shape[2:]), groups=channels)


def gaussian_blur(x: torch.Tensor, sizes: tuple[int, int], sigmas: tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W]: along W first (``sizes[1]``, ``sigmas[1]``), then H."""
    for dim, size, sigma in ((3, sizes[1], sigmas[1]), (2, sizes[0], sigmas[0])):
        pad = (size - 1) - (size - 1) // 2
        if pad >= x.shape[dim]:
            raise InputError(
                f"an image of {x.shape[2]}x{x.shape[3]} pixels is too thin for its {size}-tap antialiasing "
                "blur: pass an image at least 2 pixels on each side"
            )
        x = _blur_along(x, gaussian_window(size, sigma, x.dtype, x.device), dim)
    return x


def resize_antialiased(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, size[0], size[1]]: Gaussian blur scaled to the shrink factor of each axis,
    then bicubic interpolation with ``align_corners=True``; in ``x``'s dtype."""
    h, w = x.shape[-2:]
    sigmas = (antialias_sigma(h, size[0]), antialias_sigma(w, size[1]))
    blurred = gaussian_blur(x, (antialias_kernel_size(sigmas[0]), antialias_kernel_size(sigmas[1])), sigmas)
    return F.interpolate(blurred, size=tuple(size), mode="bicubic", align_corners=True)


def _unit_tensor(image) -> torch.Tensor:
    """A user image (a [B, 3, H, W] / [3, H, W] float tensor in [0, 1]; PIL images, paths or uint8
    arrays, alone or in a list of one size) -> [B, 3, H, W] in [0, 1] at its own size."""
    if isinstance(image, torch.Tensor):
        x = image[None] if image.dim() == 3 else image
        if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise InputError(
                f"image tensors must be float [B, 3, H, W] or [3, H, W] in [0, 1], got {tuple(image.shape)} "
                f"{image.dtype}"
            )
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise InputError("image tensors must hold values in [0, 1] (scale [-1, 1] images by x / 2 + 0.5)")
        return x
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise InputError("no image given")
    arrays = [np.asarray(load_image(im), dtype=np.float32) / 255.0 for im in images]
    if len({a.shape for a in arrays}) > 1:
        sizes = sorted({f"{a.shape[1]}x{a.shape[0]}" for a in arrays})
        raise InputError(f"a batch of images must share one size, got {', '.join(sizes)}: resize them first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel of [B, C, H, W]."""
    if len(mean) != x.shape[1] or len(std) != x.shape[1] or any(s <= 0 for s in std):
        raise InputError(f"CLIP normalisation needs {x.shape[1]} means and positive stds, got {mean} / {std}")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def clip_pixels(
    image, size: int = 224, mean: Sequence[float] = CLIP_IMAGE_MEAN, std: Sequence[float] = CLIP_IMAGE_STD
) -> torch.Tensor:
    """A conditioning image -> the CLIP image encoder's pixel values [B, 3, size, size].

    PIL images (and paths / uint8 arrays, read as RGB) are taken at their own resolution, mapped to
    [-1, 1], resized with :func:`resize_antialiased` and mapped back to [0, 1], as diffusers does.
    A [0, 1] tensor already ``size`` x ``size`` is not resized (diffusers' tensor path); a tensor of
    another size is resized as the same image given as PIL would be (diffusers passes it on unresized,
    which its CLIP refuses). Then normalised by ``mean`` / ``std`` (the feature extractor's)."""
    x = _unit_tensor(image)
    if isinstance(image, torch.Tensor) and tuple(x.shape[-2:]) == (size, size):
        return normalize(x, mean, std)
    x = resize_antialiased(x * 2.0 - 1.0, (size, size))
    return normalize((x + 1.0) / 2.0, mean, std)


@torch.no_grad()
def image_embeddings(
    encoder,
    image,
    num_videos: int = 1,
    guidance: bool = False,
    mean: Sequence[float] = CLIP_IMAGE_MEAN,
    std: Sequence[float] = CLIP_IMAGE_STD,
) -> torch.Tensor:
    """``encoder`` (models.clip_vision.CLIPVisionModelWithProjection)'s ``image_embeds`` of ``image`` as
    [B * num_videos, 1, projection] (each image's row repeated ``num_videos`` times in a row); with
    ``guidance``, zeros of the same shape first (the unconditional half), as diffusers' ``_encode_image``."""
    pixels = clip_pixels(image, encoder.config.image_size, mean, std)
    embeds = encoder(pixels.to(device=encoder.device, dtype=encoder.dtype)).image_embeds.unsqueeze(1)
    embeds = embeds.repeat_interleave(num_videos, dim=0)
    return torch.cat((torch.zeros_like(embeds), embeds)) if guidance else embeds
