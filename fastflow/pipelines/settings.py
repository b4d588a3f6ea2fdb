"""The sampling settings of a request, checked before any work (output size, number of steps,
sigmas given by the caller, images per call), and the settings a generation reports."""

from __future__ import annotations

import math
import warnings

import torch

from ..errors import InputError

MAX_STEPS = 10_000  # FLUX-dev uses 28-50; no sampler needs more
MAX_IMAGES_PER_CALL = 64  # default of BasePipeline.max_images_per_call (memory grows with it)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_size(height, width, default: tuple[int, int], multiple: int, max_side: int) -> tuple[int, int]:
    """Round height/width down to ``multiple`` (with a warning, as the references do)."""
    height = default[0] if height is None else height
    width = default[1] if width is None else width
    if not isinstance(height, int) or not isinstance(width, int):
        raise InputError(f"height and width must be integers, got {height!r} x {width!r}")
    h, w = height // multiple * multiple, width // multiple * multiple
    if (h, w) != (height, width):
        warnings.warn(f"{height}x{width} is not a multiple of {multiple}; using {h}x{w}", UserWarning, stacklevel=3)
    if h < multiple or w < multiple:
        raise InputError(f"height and width must be at least {multiple}, got {height}x{width}")
    if max(h, w) > max_side:
        raise InputError(f"{h}x{w} exceeds this model's limit of {max_side} px per side")
    return h, w


def check_steps(steps) -> int:
    if not is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"num_inference_steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    return steps


def given_sigmas(sigmas, steps: int) -> torch.Tensor:
    """``sigmas=``: the sampling noise levels, used as given (no resolution shift), strictly
    decreasing in (0, 1], one per step; the final 0 is appended."""
    try:
        values = [float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    except (TypeError, ValueError):
        raise InputError(f"sigmas must be a list of numbers, got {sigmas!r}") from None
    if len(values) != steps:
        raise InputError(f"got {len(values)} sigmas for {steps} steps: pass one per step (the final 0 is added)")
    decreasing = all(a > b for a, b in zip(values, values[1:], strict=False))
    ok = decreasing and all(math.isfinite(v) and 0 < v <= 1 for v in values)
    if not ok:
        raise InputError(f"sigmas must be strictly decreasing values in (0, 1], got {values}")
    return torch.tensor([*values, 0.0], dtype=torch.float32)


class SettingsMixin:
    """A pipeline's settings checks, reading its defaults (``self.defaults``, from the model
    config) and limits (``self.max_images_per_call``)."""

    given_sigmas = staticmethod(given_sigmas)

    def images_per_call(self, n_prompts: int, per_prompt) -> int:
        """The number of images of one call, checked against ``max_images_per_call``."""
        if not is_int(per_prompt) or per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be an integer >= 1, got {per_prompt!r}")
        n = n_prompts * per_prompt
        if n > self.max_images_per_call:
            raise InputError(
                f"{n} images in one call exceeds max_images_per_call={self.max_images_per_call}: "
                "make several calls, or raise pipe.max_images_per_call if the memory allows"
            )
        return n

    def sampling(self, num_inference_steps, sampler, sigmas=None) -> tuple[int, str]:
        if sigmas is not None and num_inference_steps is None:
            num_inference_steps = len(sigmas)
        steps = check_steps(self.defaults["steps"] if num_inference_steps is None else num_inference_steps)
        return steps, sampler or self.defaults["sampler"]

    def base_settings(self, height: int, width: int, steps: int, guidance, sampler: str) -> dict:
        loras = {n: a.scale for n, a in self._lora.adapters.items()} if self._lora is not None else {}
        return {
            **({"loras": loras} if loras else {}),
            "model": self.config.name,
            "height": height,
            "width": width,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "sampler": sampler,
            "dtype": str(self.transformer.dtype).removeprefix("torch."),
        }
