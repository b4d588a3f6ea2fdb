"""Where a component's tensors sit in a checkpoint: its prefix, its own keys, other components' keys
(all-in-one files), foreign keys and FP8 scale keys. :mod:`.describe` adds the family and naming
the keys show (:func:`fastflow.loading.describe.detect_layout`); the probes and the plan read it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from .keymaps import COMPONENT_PREFIXES, OTHER_COMPONENT_PREFIXES
from .quantized import split_quant_keys


@dataclass(frozen=True)
class Layout:
    family: str  # flux | sd3 | sdxl | vae | text_encoder | unknown
    naming: str | None  # "official" (BFL/SAI names) or "diffusers"
    prefix: str  # stripped from the component's keys ("", "model.diffusion_model.", "first_stage_model.")
    keys: tuple[str, ...]  # the component's keys with the prefix stripped
    other_keys: tuple[str, ...]  # keys of other components (left for their loaders)
    foreign_keys: tuple[str, ...]  # keys that belong to nothing known
    quant_keys: tuple[str, ...] = ()  # FP8 scales and format markers, prefix stripped (loading/quantized.py)


# Training-time buffers sgm / ldm engine checkpoints carry beside the model (the noise schedule of
# sgm's DiscreteDenoiser, ldm's DDPM buffers, the EMA copy and its counters): not model weights;
# diffusers' single-file loader and sgm's inference path skip them too. Skipped with a note.
ENGINE_BUFFERS = re.compile(
    r"^(denoiser\.(sigmas|log_sigmas)|model_ema\..*|betas|alphas_cumprod(_prev)?|sqrt_alphas_cumprod"
    r"|sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip(m1)?_alphas_cumprod"
    r"|posterior_(variance|log_variance_clipped|mean_coef1|mean_coef2)|logvar|lvlb_weights)$"
)


def skip_engine_buffers(keys: list[str]) -> list[str]:
    """``keys`` without sgm / ldm engine buffers (:data:`ENGINE_BUFFERS`), with a one-line note
    naming what was skipped."""
    skipped = [k for k in keys if ENGINE_BUFFERS.match(k)]
    if not skipped:
        return keys
    shown = ", ".join(sorted(skipped)[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    warnings.warn(
        f"skipping {len(skipped)} sampler/EMA buffer(s) of the training engine, not model weights: {shown}",
        stacklevel=2,
    )
    return [k for k in keys if not ENGINE_BUFFERS.match(k)]


def _is_other_component(key: str) -> bool:
    return key.startswith(OTHER_COMPONENT_PREFIXES)


def split_keys(keys, component: str = "transformer") -> tuple[str, list[str], list[str], list[str], list[str]]:
    """(prefix, the component's own keys with it stripped, other known components' keys (all-in-one
    files), foreign keys, FP8 scale keys)."""
    keys = skip_engine_buffers(list(keys))
    own = COMPONENT_PREFIXES[component]
    prefix = next((p for p in own if any(k.startswith(p) for k in keys)), "")
    mine, other, foreign = [], [], []
    for k in keys:
        if prefix and k.startswith(prefix):
            mine.append(k[len(prefix) :])
        elif _is_other_component(k):
            other.append(k)
        elif prefix:
            foreign.append(k)
        else:
            mine.append(k)
    mine, quant = split_quant_keys(mine)
    return prefix, mine, other, foreign, quant
