"""Stable Video Diffusion's request checks and inputs: the argument bounds (typed errors before any
work), the conditioning images (read once, for CLIP at their own size and for the VAE at the
output size) and the output formats of diffusers' ``VideoProcessor.postprocess_video``."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, plain_number
from .images import load_image, to_tensor

MAX_FRAMES = 128  # sgm's demo allows T up to 128; SVD was trained on 14 / 25
MAX_SIDE = 2048  # SVD is trained at 576x1024; 2x its side
MAX_VIDEOS_PER_CALL = 16
FPS_RANGE = (1, 240)  # the model sees fps - 1 (sgm's fps_id, 5..30 in its demo warnings)
MOTION_BUCKET_RANGE = (0, 511)  # sgm's demo slider
NOISE_AUG_RANGE = (0.0, 1.0)  # a std on images in [-1, 1]; above 1 the image is drowned


def _int(value, name: str, lo: int, hi: int) -> int:
    value = plain_number(value)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InputError(f"{name} must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _number(value, name: str, lo: float, hi: float) -> float:
    value = plain_number(value)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not lo <= value <= hi:
        raise InputError(f"{name} must be a number from {lo} to {hi}, got {value!r}")
    return float(value)


def check_video_request(r, default_frames: int) -> None:
    """Bounds of the SVD arguments, in place on the request namespace (defaults filled in)."""
    r.num_frames = _int(default_frames if r.num_frames is None else r.num_frames, "num_frames", 1, MAX_FRAMES)
    r.fps = _number(r.fps, "fps", *FPS_RANGE)
    r.motion_bucket_id = _number(r.motion_bucket_id, "motion_bucket_id", *MOTION_BUCKET_RANGE)
    r.noise_aug_strength = _number(r.noise_aug_strength, "noise_aug_strength", *NOISE_AUG_RANGE)
    chunk = r.num_frames if r.decode_chunk_size is None else r.decode_chunk_size  # diffusers' default
    r.decode_chunk_size = _int(chunk, "decode_chunk_size", 1, 1 << 20)
    r.num_videos_per_prompt = _int(r.num_videos_per_prompt, "num_videos_per_prompt", 1, MAX_VIDEOS_PER_CALL)


def check_size(height, width, default: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(height, width): multiples of ``multiple`` (the VAE's and the UNet's downsampling together:
    64 for SVD), refused otherwise (no silent rounding: the frames would not have the size asked)."""
    h = default[0] if height is None else plain_number(height)
    w = default[1] if width is None else plain_number(width)
    for name, v in (("height", h), ("width", w)):
        if not isinstance(v, int) or isinstance(v, bool) or v < multiple or v % multiple or v > MAX_SIDE:
            raise InputError(
                f"{name} must be a multiple of {multiple} from {multiple} to {MAX_SIDE} (the VAE and the UNet "
                f"halve the frames {int(math.log2(multiple))} times), got {v!r}"
            )
    return h, w


def read_images(image) -> tuple[object, int]:
    """The conditioning image(s) as given to CLIP (a [B, 3, H, W] [0, 1] tensor, or a list of RGB
    PIL images of one size, paths and arrays read) and the batch size. Anything else, or no image,
    is an InputError."""
    if image is None:
        raise InputError(
            "Stable Video Diffusion needs image= (a PIL image, a path, or a [B, 3, H, W] tensor in [0, 1])"
        )
    if isinstance(image, torch.Tensor):
        x = image[None] if image.dim() == 3 else image
        if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point() or min(x.shape) < 1:
            raise InputError(f"image tensors must be float [B, 3, H, W] or [3, H, W] in [0, 1], got "
                             f"{tuple(image.shape)} {image.dtype}")  # fmt: skip
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise InputError("image tensors must hold finite values in [0, 1] (scale [-1, 1] images by x / 2 + 0.5)")
        return x.float().cpu(), x.shape[0]
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise InputError("no image given")
    images = [load_image(im) for im in images]
    if len({im.size for im in images}) > 1:
        raise InputError("a batch of images must share one size: resize them first")
    return images, len(images)


def vae_pixels(images, height: int, width: int) -> torch.Tensor:
    """The VAE's input [B, 3, height, width] in [-1, 1] fp32 on the CPU, as diffusers'
    ``video_processor.preprocess``: PIL images resized with LANCZOS; tensors with
    ``F.interpolate`` (nearest)."""
    if isinstance(images, torch.Tensor):
        return F.interpolate(images, size=(height, width)) * 2.0 - 1.0
    return torch.cat([to_tensor(im, width, height) for im in images])


def format_video(frames: torch.Tensor, output_type: str):
    """Decoded clips [B, 3, F, H, W] in [-1, 1] -> diffusers' layouts: "pt" [B, F, 3, H, W] and "np"
    [B, F, H, W, 3] float32 in [0, 1]; "pil" a list (per video) of lists of PIL images."""
    x = (frames.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]
    if output_type == "pt":
        return x
    array = x.permute(0, 1, 3, 4, 2).cpu().numpy().astype(np.float32)
    if output_type == "np":
        return array
    from PIL import Image

    return [[Image.fromarray(f) for f in (clip * 255).round().astype(np.uint8)] for clip in array]
