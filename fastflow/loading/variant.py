"""Which config a checkpoint is: ``config=`` or ``variant=`` if given (checked against the
tensors' architecture), else the only registered config with that architecture, else the one the
metadata, file name, pipeline class or scheduler names, else the one a diffusers ``config.json``
describes; then what the folder's config.json adds (:attr:`FamilySpec.refine`). Part of the
description stage (:mod:`.describe`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import AmbiguousVariantError, UnknownConfigError, VariantMismatchError
from ..models import configs as registry
from . import described
from .families import FAMILIES, FAMILY_NAMES, describe_arch
from .layout import Layout
from .source import CheckpointSource

_VAE_SCALES = {"flux": 0.3611, "sd3": 1.5305, "sdxl": 0.13025}


def _vae_hint(source: CheckpointSource, layout: Layout | None, candidates: list, prefer: str | None) -> list:
    """FLUX and SD3 VAEs share tensors: a diffusers config.json gives the latent scale and shift;
    an SAI single file (``first_stage_model.``) holds the SD3 VAE."""
    factors = described.vae_latent_factors(source)
    if factors is not None:
        same = [
            c for c in candidates if abs(c.scale_factor - factors[0]) < 1e-6 and abs(c.shift_factor - factors[1]) < 1e-6
        ]
        return same or candidates[:1]  # the file's own factors are applied by resolve_config
    if layout is not None and layout.prefix == "first_stage_model.":
        prefer = "sd3"
    if prefer in _VAE_SCALES:
        return [c for c in candidates if abs(c.scale_factor - _VAE_SCALES[prefer]) < 1e-6]
    return []


def _metadata_hint(source: CheckpointSource, candidates: list, layout: Layout | None = None, prefer=None) -> list:
    named = source.metadata.get("fastflow.variant")
    if named:
        return [c for c in candidates if c.name == named]
    if candidates[0].family == "vae":
        return _vae_hint(source, layout, candidates, prefer)
    text = " ".join(
        str(v) for k, v in source.metadata.items() if k.startswith("modelspec.") or k in ("name", "model")
    ).lower()
    if source.pipeline_class:
        text += " " + source.pipeline_class.lower()
    if candidates[0].family == "sdxl" and Path(source.path).is_file():  # sd_xl_turbo_1.0_fp16.safetensors
        text += " " + Path(source.path).stem.lower()
    text += " " + str(source.folder_config.get("_name_or_path", "")).lower()
    named = bool(text.strip())  # something names the model...
    if any(getattr(c, "conditioning", None) == "control" for c in candidates):  # FLUX.1 Canny / Depth
        return _control_hint(text + " " + Path(source.path).stem.lower(), candidates, source)
    if any(hasattr(c, "kontext") for c in candidates):
        if "kontext" in text:
            return [c for c in candidates if c.kontext]
        if named:  # ...and not as Kontext (FluxPipeline, "FLUX.1-dev")
            return [c for c in candidates if not c.kontext]
    if any(hasattr(c, "turbo") for c in candidates):
        spacing = source.scheduler_config.get("timestep_spacing")
        if candidates[0].family == "sdxl" and spacing in ("trailing", "leading"):  # Turbo's scheduler: trailing
            return [c for c in candidates if c.turbo == (spacing == "trailing")]
        if "turbo" in text:
            return [c for c in candidates if c.turbo]
        if any(k.startswith("modelspec.") for k in source.metadata):  # the file names itself, not as turbo
            return [c for c in candidates if not c.turbo]
        if candidates[0].family == "sdxl" and Path(source.path).is_file():  # unnamed: almost all are base
            base = [c for c in candidates if not c.turbo]
            if len(base) == 1:
                warnings.warn(
                    f"{Path(source.path).name}: nothing names the SDXL variant; loading it as "
                    f"{base[0].name!r} (pass variant='sdxl-turbo' for a Turbo model)",
                    stacklevel=2,
                )
            return base
    return []


def _control_hint(text: str, candidates: list, source: CheckpointSource) -> list:
    """FLUX.1 Canny and Depth have the same tensors (only their default guidance differs): Depth
    where something names it, else Canny, with a warning when nothing names Canny either."""
    depth = [c for c in candidates if "depth" in c.name]
    canny = [c for c in candidates if c not in depth]
    if "depth" in text:
        return depth
    if "canny" not in text and len(canny) == 1:
        warnings.warn(
            f"{Path(source.path).name}: a FLUX.1 control model that nothing names Canny or Depth; loading it "
            f"as {canny[0].name!r} (pass variant= with the Depth name for Depth's default guidance)",
            stacklevel=2,
        )
    return canny


def resolve_config(
    family: str,
    arch: tuple,
    source: CheckpointSource,
    variant: str | None,
    config=None,
    layout: Layout | None = None,
    prefer: str | None = None,
):
    """Pick the config: ``config=`` or ``variant=`` if given (checked against the weights), else the
    only registered config with this architecture, else the one the metadata names. A VAE
    folder's config.json scale/shift always apply (registered values are defaults), except over
    an explicit ``config=``."""
    cfg = _resolve(family, arch, source, variant, config, layout, prefer)
    refine = FAMILIES[family].refine
    return cfg if config is not None or refine is None else refine(cfg, source)


def _described_name(source: CheckpointSource) -> str:
    path = Path(source.path)
    label = path.parent.name if path.is_dir() and path.name == "transformer" else path.stem
    return f"custom:{label}"


def _inpainting(cfg, arch: tuple):
    """``cfg`` as an SDXL inpainting UNet (issue 35) when ``arch`` is its architecture but for
    in_channels = 2 x latent + 1 (noise, mask and masked-image latents), else None."""
    if cfg.family != "sdxl" or arch[0] != 2 * cfg.in_channels + 1:
        return None
    wider = cfg.replace(in_channels=arch[0])
    return wider if wider.arch() == arch else None


def _resolve(family, arch, source, variant, config, layout, prefer):
    spec = FAMILIES[family]
    if isinstance(config, dict):  # fields of the family's config class (the rest: full-size values)
        config = described.from_fields(family, spec.config_class, config, _described_name(source))
    if config is not None or variant is not None:
        cfg = config if config is not None else registry.from_name(variant)
        if config is None and _inpainting(cfg, arch) is not None:
            return _inpainting(cfg, arch)
        if cfg.family != family or cfg.arch() != arch:
            raise VariantMismatchError(
                source.path,
                f"{cfg.name} does not fit this checkpoint's tensors ({FAMILY_NAMES[family]} with "
                f"{describe_arch(arch, family)})",
                "pass the variant that matches the file, or leave variant= unset to detect it",
            )
        return cfg
    candidates = [c for c in registry.configs_of(family) if c.arch() == arch]
    if not candidates:
        cfg = spec.from_folder(source, _described_name(source)) if spec.from_folder is not None else None
        if cfg is not None:  # a diffusers folder's config.json describes it
            if cfg.arch() != arch:
                raise VariantMismatchError(
                    source.path,
                    f"its config.json describes {describe_arch(cfg.arch(), family)} but the tensors are "
                    f"{describe_arch(arch, family)}",
                    "fix config.json, or pass config={...} with the fields that describe the tensors",
                )
            return cfg
        candidates = [w for c in registry.configs_of(family) if (w := _inpainting(c, arch)) is not None]
    if not candidates:
        cls = type(registry.configs_of(family)[0]).__name__
        raise UnknownConfigError(
            source.path,
            f"{FAMILY_NAMES[family]} with {describe_arch(arch, family)} fits no registered config "
            f"(known: {', '.join(registry.list_models(family, include_tiny=True))}) and no diffusers "
            "config.json describes it",
            f"describe it: fastflow.load(..., config={{'depth': ..., ...}}) (fields of {cls}; the rest "
            "default to the full-size model) or fastflow generate --config '{\"depth\": ...}' (or a .json file)",
        )
    if len(candidates) == 1:
        return candidates[0]
    hinted = _metadata_hint(source, candidates, layout, prefer)
    if len(hinted) == 1:
        return hinted[0]
    names = " or ".join(repr(c.name) for c in candidates)
    raise AmbiguousVariantError(
        source.path,
        f"its tensors fit {names} equally (these variants have identical keys and shapes) and the "
        "file's metadata does not say which",
        f"pass variant= explicitly, e.g. variant={candidates[0].name!r}",
    )
