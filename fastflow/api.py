"""``fastflow.load()``: a pipeline from local files, never the network."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .loading.components import load_components
from .pipelines import FluxPipeline, SD3Pipeline

PIPELINES = {"flux": FluxPipeline, "sd3": SD3Pipeline}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(
    path: str | os.PathLike,
    variant: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    vae: str | os.PathLike | None = None,
    text_encoders=None,
    t5_max_length: int | None = None,
    quant=None,
):
    """A ready pipeline (FluxPipeline or SD3Pipeline) from local files.

    ``path``: a diffusers pipeline folder (transformer/, vae/, text_encoder*/, tokenizer*/) or a single
    transformer file, with ``vae=`` (a file or folder) and ``text_encoders=`` ({"clip_l": folder,
    "clip_g": folder, "t5": folder}; a folder may be a (model, tokenizer) pair; False: none, for use
    with prompt embeddings). ``variant`` where the keys cannot tell (Kontext vs dev, large vs turbo).
    Sampling defaults come from the model's config. ``quant``: None keeps the transformer file's
    format (an FP8 file runs in FP8), "fp8" (or a :class:`fastflow.quant.Fp8Config`) quantizes its
    linear layers to FP8 while loading, "none" loads FP8 files dequantized.
    """
    path = Path(path).expanduser()
    parts = load_components(path, variant, device or _default_device(), dtype, vae, text_encoders, t5_max_length, quant)
    return PIPELINES[parts.family](parts.transformer, parts.vae, parts.text)
