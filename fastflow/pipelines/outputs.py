"""What a generation hands back: :class:`PipelineOutput` (diffusers' access by index or name) and
the decoded images in the ``output_type`` asked for."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .images import to_numpy, to_pil, to_unit

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineOutput:
    """images (per ``output_type``), the seed of each image (None when a generator was given),
    the settings actually used and per-stage wall times in seconds."""

    images: object
    seeds: list[int | None]
    settings: dict
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # transformer work (see fastflow.caching.CacheStats)

    def __getitem__(self, key):
        """diffusers' output access: ``out[0]`` (the images) or ``out["images"]``."""
        if isinstance(key, str):
            return getattr(self, key)
        return (self.images,)[key]

    def to_tuple(self) -> tuple:
        return (self.images,)


def check_output_type(output_type: str) -> str:
    """One of OUTPUT_TYPES (any case, as diffusers accepts "PIL")."""
    normal = output_type.lower() if isinstance(output_type, str) else output_type
    if normal not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    return normal


def format_images(images: torch.Tensor, output_type: str):
    """As diffusers: "pil" a list of images, "np" float32 [B, H, W, 3] in [0, 1], "pt" [B, 3, H, W]
    in [0, 1]."""
    if output_type == "pil":
        return to_pil(images)
    return to_numpy(images) if output_type == "np" else to_unit(images)
