"""Finding and building every pipeline component from local files: the transformer and VAE
(through :mod:`fastflow.loading.loader`), the CLIP / T5 text encoders and their tokenizers, from a
diffusers pipeline folder or from single files and folders given one by one. ``fastflow.load()``
only composes what this module returns.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, MissingComponentError
from ..models.text import CLIPEncoder, FluxTextEncoder, SD3TextEncoder, SDXLTextEncoder, T5Encoder
from .loader import load_transformer, load_vae
from .text import load_text_model
from .tokenizer import check_tokenizer_fits, load_tokenizer

# diffusers pipeline-folder text components per family: (subfolder, tokenizer subfolder, role)
TEXT_LAYOUT = {
    "flux": [("text_encoder", "tokenizer", "clip_l"), ("text_encoder_2", "tokenizer_2", "t5")],
    "sd3": [
        ("text_encoder", "tokenizer", "clip_l"),
        ("text_encoder_2", "tokenizer_2", "clip_g"),
        ("text_encoder_3", "tokenizer_3", "t5"),
    ],
    "sdxl": [("text_encoder", "tokenizer", "clip_l"), ("text_encoder_2", "tokenizer_2", "clip_g")],
}
OPTIONAL_TEXT = {"sd3": {"t5"}}  # SD3 runs without T5 (zeros in its place)


@dataclass
class Components:
    """What a pipeline is built from. ``text`` is None when text encoders were declined."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    text: object | None

    @property
    def family(self) -> str:
        return self.transformer.config.family


def _found(folder: Path) -> str:
    return ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"


def _tokenizer_folder(model, tokenizer, what: str) -> Path:
    folder = Path(tokenizer or model).expanduser()
    if folder.is_file():
        raise CheckpointError(
            folder,
            f"a single-file {what} carries no tokenizer",
            "pass the file with its tokenizer folder, e.g. text_encoders={'clip_l': ('clip_l.safetensors', "
            "'./tokenizer')}",
        )
    return folder


def load_clip(
    model_folder, tokenizer_folder=None, with_projection: bool = False, dtype=torch.float32, device="cpu", role=None
):
    """A :class:`CLIPEncoder` from a local folder (with ``text_projection`` for SD3 and SDXL's
    OpenCLIP-G); ``role`` "clip_l" / "clip_g" also reads an SDXL single file's own encoders."""
    tok_folder = _tokenizer_folder(model_folder, tokenizer_folder, "CLIP text encoder")  # before any weight
    model = load_text_model(
        "clip", model_folder, "CLIP text encoder", dtype, device, projection=with_projection, role=role
    )
    encoder = CLIPEncoder(model, load_tokenizer(tok_folder, "CLIP text encoder", "clip"))
    cfg = model.config
    check_tokenizer_fits(cfg.max_position_embeddings, "CLIP text encoder", tok_folder, encoder.max_length)
    return encoder


def load_t5(model_folder, tokenizer_folder=None, dtype=torch.bfloat16, device="cpu") -> T5Encoder:
    """A :class:`T5Encoder` from a local folder; never in fp16 (bf16 instead, with a warning)."""
    if dtype == torch.float16:
        warnings.warn("T5 overflows in float16; loading it in bfloat16 instead", UserWarning, stacklevel=3)
        dtype = torch.bfloat16
    tok_folder = _tokenizer_folder(model_folder, tokenizer_folder, "T5 encoder")  # before any weight
    model = load_text_model("t5", model_folder, "T5 encoder", dtype, device)
    tokenizer = load_tokenizer(tok_folder, "T5 encoder", "t5")
    return T5Encoder(model, tokenizer)  # which checks the tokenizer's ids against the embedding


def text_sources(path: Path, family: str, text_encoders) -> dict[str, tuple[Path, Path]]:
    """role -> (model folder, tokenizer folder), from ``text_encoders=`` or the pipeline folder."""
    if text_encoders is not None:
        sources = {}
        for role, value in dict(text_encoders).items():
            model, tok = (value, value) if isinstance(value, (str, os.PathLike)) else value
            sources[role] = (Path(model), Path(tok))
        return sources
    if not path.is_dir():
        return {}
    return {role: (path / sub, path / tok) for sub, tok, role in TEXT_LAYOUT[family] if (path / sub).is_dir()}


def require_text(sources: dict, family: str, where: Path) -> None:
    needed = [role for _, _, role in TEXT_LAYOUT[family] if role not in OPTIONAL_TEXT.get(family, set())]
    missing = [r for r in needed if r not in sources]
    if missing:
        found = _found(where) if where.is_dir() else f"a single file ({where.name})"
        subfolders = {role: sub for sub, _, role in TEXT_LAYOUT[family]}
        if family == "sdxl" and where.is_file():
            raise MissingComponentError(
                f"{where}: text encoder(s) {', '.join(missing)} not given. An SDXL single file holds both "
                "but no tokenizers: pass text_encoders={'clip_l': (file, './tokenizer'), 'clip_g': (file, "
                "'./tokenizer_2')} (the file itself with each tokenizer folder), or folders of the encoders, "
                "or text_encoders=False to use prompt embeddings only"
            )
        raise MissingComponentError(
            f"{where}: text encoder(s) {', '.join(missing)} not found (found: {found}). Needed: "
            + ", ".join(f"{r} ({subfolders[r]}/ in a diffusers folder)" for r in needed)
            + ". Pass text_encoders={'clip_l': folder, ...}, or text_encoders=False to use prompt embeddings only"
        )


def load_text_encoders(family: str, sources: dict, dtype, device, t5_max_length: int):
    """The family's text encoder (FluxTextEncoder or SD3TextEncoder) from ``sources``."""

    def clip(role, projection):
        model, tok = sources[role]
        return load_clip(model, tok, with_projection=projection, dtype=dtype, device=device, role=role)

    t5 = None
    if "t5" in sources:
        model, tok = sources["t5"]
        t5 = load_t5(model, tok, dtype=torch.bfloat16 if dtype == torch.float16 else dtype, device=device)
    if family == "flux":
        return FluxTextEncoder(clip("clip_l", False), t5, max_length=t5_max_length)
    if family == "sdxl":  # CLIP-L's penultimate states; OpenCLIP-G's too, and its projected pooled output
        return SDXLTextEncoder(clip("clip_l", False), clip("clip_g", True))
    if t5 is None:
        warnings.warn(
            "no T5 encoder: SD3 will run on CLIP features only (zeros in T5's place)", UserWarning, stacklevel=3
        )
    return SD3TextEncoder(clip("clip_l", True), clip("clip_g", True), t5, context_width=4096 if t5 is None else None)


def load_components(
    path: Path,
    variant: str | None,
    device,
    dtype: torch.dtype,
    vae=None,
    text_encoders=None,
    t5_max_length: int | None = None,
    quant=None,
    config=None,
) -> Components:
    """Transformer, VAE and text encoders for the model at ``path`` (see ``fastflow.load``)."""
    transformer = load_transformer(path, variant=variant, dtype=dtype, device=device, quant=quant, config=config)
    family = transformer.config.family
    if vae is None and not path.is_dir() and family == "flux":
        raise MissingComponentError(f"{path} is a single transformer file: pass vae=<ae.safetensors or VAE folder>")
    # a pipeline folder's vae/ (or an SD3 single file's first_stage_model.*) unless vae= is given
    autoencoder = load_vae(vae if vae is not None else path, dtype=dtype, device=device, prefer=family)
    text = None
    if text_encoders is not False:
        sources = text_sources(path, family, text_encoders)
        require_text(sources, family, path)
        max_length = t5_max_length or getattr(transformer.config, "t5_max_length", 256)
        text = load_text_encoders(family, sources, dtype, device, max_length)
    return Components(transformer, autoencoder, text)
