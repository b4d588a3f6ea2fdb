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


def canny(image, low: float = 100, high: float = 200):
    """Canny edges of ``image`` (a path, PIL image or uint8 array) as an RGB PIL image, white edges
    on black: the control map FLUX.1 Canny takes. The steps of ``cv2.Canny(gray, low, high)`` with
    its defaults, in numpy: 3x3 Sobel (replicated border, no blur), L1 magnitude |gx| + |gy|,
    non-maximum suppression in 4 directions with OpenCV's tan(22.5) / tan(67.5) sectors and its
    tie rules, then hysteresis: pixels above ``high`` and the 8-connected pixels above ``low``; the
    grayscale is OpenCV's fixed-point one. It gave the same pixels as OpenCV 5.1's
    ``cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high)`` on every image compared (a
    one-off check; OpenCV is no dependency). Unlike OpenCV, ``low > high`` is an error, not swapped."""
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise InputError(f"canny {name} must be a finite number >= 0, got {value!r}")
    if low > high:
        raise InputError(f"canny low ({low}) must not exceed high ({high})")
    from PIL import Image

    rgb = np.asarray(load_image(image), dtype=np.int64)
    # OpenCV's RGB -> gray in fixed point (0.299, 0.587, 0.114 in 15 bits, rounded), not Pillow's
    gray = (rgb[..., 0] * 9798 + rgb[..., 1] * 19235 + rgb[..., 2] * 3735 + (1 << 14)) >> 15
    edges = _hysteresis(*_suppressed(gray), int(np.floor(low)), int(np.floor(high)))
    return Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).convert("RGB")


def _suppressed(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(magnitude, kept by non-maximum suppression) of an [H, W] int image."""
    p = np.pad(gray, 1, mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.abs(dx) + np.abs(dy)
    m = np.pad(mag, 1)  # neighbours outside the image count as 0

    def at(di: int, dj) -> np.ndarray:
        rows = np.arange(gray.shape[0])[:, None] + 1 + di
        cols = np.arange(gray.shape[1])[None, :] + 1 + dj
        return m[rows, cols]

    x, y = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << 15
    tg22x = x * 13573  # round(tan(22.5 deg) * 2**15)
    tg67x = tg22x + (x << 16)
    s = np.where((dx ^ dy) < 0, -1, 1)
    horizontal = (mag > at(0, -1)) & (mag >= at(0, 1))
    vertical = (mag > at(-1, 0)) & (mag >= at(1, 0))
    diagonal = (mag > at(-1, -s)) & (mag > at(1, s))
    keep = np.where(y < tg22x, horizontal, np.where(y > tg67x, vertical, diagonal))
    return mag, keep


def _hysteresis(mag: np.ndarray, keep: np.ndarray, low: int, high: int) -> np.ndarray:
    """Edges: kept pixels above ``high``, grown through 8-connected kept pixels above ``low``."""
    weak = keep & (mag > low)
    h, w = weak.shape
    edges = weak & (mag > high)
    frontier = np.flatnonzero(edges)
    flat_weak, flat_edges = weak.ravel(), edges.ravel()
    while frontier.size:
        r, c = np.divmod(frontier, w)
        found = []
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                rr, cc = r + di, c + dj
                inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
                idx = rr[inside] * w + cc[inside]
                found.append(idx[flat_weak[idx] & ~flat_edges[idx]])
        frontier = np.unique(np.concatenate(found))
        flat_edges[frontier] = True
    return flat_edges.reshape(h, w)
