"""Image conversion: user images in (PIL, path, array, tensor) -> [-1, 1] tensors, and back out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

# (width, height) pairs Kontext was trained on (BFL PREFERED_KONTEXT_RESOLUTIONS; REFERENCE.md 4.2).
KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]  # fmt: skip


def load_image(image):
    """A PIL RGB image from a path, PIL image (any mode; EXIF rotation applied; transparency over
    white) or HxWx3 uint8 array."""
    from PIL import Image, ImageOps

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"input image {path} not found")
        try:
            image = Image.open(path)
            image.load()
        except OSError as e:
            raise InputError(f"{path} is not an image Pillow can read ({e})") from None
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
            raise InputError(f"image arrays must be HxWx3 (or 4) uint8, got {image.shape} {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"image must be a path, PIL image or uint8 array, got {type(image).__name__}")
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def kontext_size(width: int, height: int, multiple: int = 16) -> tuple[int, int]:
    """The preferred Kontext (width, height) closest in aspect ratio, on a multiple of ``multiple``."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return w // multiple * multiple, h // multiple * multiple


def to_tensor(image, width: int, height: int) -> torch.Tensor:
    """PIL image -> [1, 3, height, width] in [-1, 1], resized with LANCZOS when the size differs."""
    from PIL import Image

    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def as_uint8(images: np.ndarray) -> np.ndarray:
    """``output_type="np"`` images (float in [0, 1], diffusers' convention) as the 8-bit values a
    PNG stores; uint8 input is returned as it is."""
    if images.dtype == np.uint8:
        return images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Decoded [B, 3, H, W] in [-1, 1] -> [B, 3, H, W] in [0, 1]: (x / 2 + 0.5) clamped, in fp32
    (diffusers' "pt")."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """Decoded [B, 3, H, W] in [-1, 1] -> float32 [B, H, W, 3] in [0, 1] (diffusers' "np")."""
    return to_unit(images).permute(0, 2, 3, 1).cpu().numpy()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8: :func:`to_numpy`, x255, rounded."""
    return as_uint8(to_numpy(images))


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(images)]
