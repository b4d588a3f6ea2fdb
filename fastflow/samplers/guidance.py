"""Guidance rules as pure functions of velocities (REFERENCE.md sections 4.2-4.3)."""

from __future__ import annotations

import torch


def cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)


def cfg_batched(velocity_batch, x: torch.Tensor, sigma: float, scale: float) -> torch.Tensor:
    """Run cond and uncond as one batch [cond ; uncond] and combine. ``velocity_batch(x2, sigma)``
    gets x repeated twice along the batch and returns [v_cond ; v_uncond]."""
    v = velocity_batch(torch.cat((x, x)), sigma)
    v_cond, v_uncond = v.chunk(2)
    return cfg(v_cond, v_uncond, scale)


def skip_layer_guidance(v: torch.Tensor, v_cond: torch.Tensor, v_skip: torch.Tensor, scale: float) -> torch.Tensor:
    """SD3.5 SLG: v + scale * (cond - cond_with_layers_skipped) (diffusers; SAI's x0 form is equivalent)."""
    return v + scale * (v_cond - v_skip)


def slg_active(step: int, steps: int, start: float = 0.01, stop: float = 0.2) -> bool:
    """SLG applies on steps strictly between start * steps and stop * steps (SAI and diffusers)."""
    return start * steps < step < stop * steps
