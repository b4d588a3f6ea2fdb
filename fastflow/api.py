"""``fastflow.load()``: a pipeline from local files, never the network."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .errors import MissingComponentError
from .loading import load_transformer, load_vae
from .models.text import CLIPEncoder, FluxTextEncoder, SD3TextEncoder, T5Encoder
from .pipelines import FluxPipeline, SD3Pipeline

# diffusers pipeline-folder components per family: (subfolder, tokenizer subfolder, role)
_TEXT_LAYOUT = {
    "flux": [("text_encoder", "tokenizer", "clip_l"), ("text_encoder_2", "tokenizer_2", "t5")],
    "sd3": [
        ("text_encoder", "tokenizer", "clip_l"),
        ("text_encoder_2", "tokenizer_2", "clip_g"),
        ("text_encoder_3", "tokenizer_3", "t5"),
    ],
}
_OPTIONAL = {"sd3": {"t5"}}  # SD3 runs without T5 (zeros in its place)
PIPELINE_SETTINGS = "fastflow_pipeline.json"  # optional per-folder defaults (e.g. the embedded model)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _found(folder: Path) -> str:
    return ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"


def _text_sources(path: Path, family: str, text_encoders) -> dict[str, tuple[Path, Path]]:
    """role -> (model folder, tokenizer folder), from ``text_encoders=`` or the pipeline folder."""
    if text_encoders is not None:
        sources = {}
        for role, value in dict(text_encoders).items():
            model, tok = (value, value) if isinstance(value, (str, os.PathLike)) else value
            sources[role] = (Path(model), Path(tok))
        return sources
    if not path.is_dir():
        return {}
    return {role: (path / sub, path / tok) for sub, tok, role in _TEXT_LAYOUT[family] if (path / sub).is_dir()}


def _require(sources: dict, family: str, where: Path) -> None:
    needed = [role for _, _, role in _TEXT_LAYOUT[family] if role not in _OPTIONAL.get(family, set())]
    missing = [r for r in needed if r not in sources]
    if missing:
        found = _found(where) if where.is_dir() else f"a single file ({where.name})"
        subfolders = {role: sub for sub, _, role in _TEXT_LAYOUT[family]}
        raise MissingComponentError(
            f"{where}: text encoder(s) {', '.join(missing)} not found (found: {found}). Needed: "
            + ", ".join(f"{r} ({subfolders[r]}/ in a diffusers folder)" for r in needed)
            + ". Pass text_encoders={'clip_l': folder, ...}, or text_encoders=False to use prompt embeddings only"
        )


def _load_text(family: str, sources: dict, dtype, device, t5_max_length: int):
    def clip(role, projection):
        model, tok = sources[role]
        return CLIPEncoder.from_folder(model, tok, with_projection=projection, dtype=dtype, device=device)

    t5 = None
    if "t5" in sources:
        model, tok = sources["t5"]
        t5 = T5Encoder.from_folder(model, tok, dtype=torch.bfloat16 if dtype == torch.float16 else dtype, device=device)
    if family == "flux":
        return FluxTextEncoder(clip("clip_l", False), t5, max_length=t5_max_length)
    if t5 is None:
        warnings.warn(
            "no T5 encoder: SD3 will run on CLIP features only (zeros in T5's place)", UserWarning, stacklevel=3
        )
    return SD3TextEncoder(clip("clip_l", True), clip("clip_g", True), t5, context_width=4096 if t5 is None else None)


def load(
    path: str | os.PathLike,
    variant: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    vae: str | os.PathLike | None = None,
    text_encoders=None,
    t5_max_length: int | None = None,
):
    """A ready pipeline (FluxPipeline or SD3Pipeline) from local files.

    ``path``: a diffusers pipeline folder (transformer/, vae/, text_encoder*/, tokenizer*/) or a single
    transformer file, with ``vae=`` (a file or folder) and ``text_encoders=`` ({"clip_l": folder,
    "clip_g": folder, "t5": folder}; a folder may be a (model, tokenizer) pair; False: none, for use
    with prompt embeddings). ``variant`` where the keys cannot tell (Kontext vs dev, large vs turbo).
    """
    path = Path(path).expanduser()
    device = device or _default_device()
    transformer = load_transformer(path, variant=variant, dtype=dtype, device=device)
    family = transformer.config.family
    if vae is None and not path.is_dir() and family == "flux":
        raise MissingComponentError(f"{path} is a single transformer file: pass vae=<ae.safetensors or VAE folder>")
    # a pipeline folder's vae/ (or an SD3 single file's first_stage_model.*) unless vae= is given
    autoencoder = load_vae(vae if vae is not None else path, dtype=dtype, device=device, prefer=family)

    text = None
    if text_encoders is not False:
        sources = _text_sources(path, family, text_encoders)
        _require(sources, family, path)
        text = _load_text(
            family, sources, dtype, device, t5_max_length or getattr(transformer.config, "t5_max_length", 256)
        )
    settings = {}
    if path.is_dir() and (path / PIPELINE_SETTINGS).is_file():
        settings = json.loads((path / PIPELINE_SETTINGS).read_text())
    kwargs = {"default_size": tuple(settings["default_size"])} if "default_size" in settings else {}
    pipeline_cls = FluxPipeline if family == "flux" else SD3Pipeline
    pipeline = pipeline_cls(transformer, autoencoder, text, **kwargs)
    pipeline.defaults.update(settings.get("defaults", {}))
    pipeline.view_upscale = int(settings.get("view_upscale", 1))  # the CLI's default PNG upscale
    return pipeline
