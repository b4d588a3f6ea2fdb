"""Load a transformer checkpoint into our modules: detect, validate everything, then copy.

Order matters for users: every name, shape and dtype is checked against the config before a
single weight byte is read or a tensor allocated. Tensors are then built one at a time from the
memory map straight into their final dtype and device, so peak memory is the loaded model plus
one tensor.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from math import prod

import torch

from ..errors import (
    FamilyMismatchError,
    MissingKeysError,
    ShapeMismatchError,
    UnexpectedKeysError,
    UnsupportedDtypeError,
)
from ..models import configs as registry
from ..models.flux import Flux
from ..models.mmdit import MMDiT
from ..models.vae import AutoEncoder
from .detect import FAMILY_NAMES, Layout, detect_layout, flux_arch, resolve_config, sd3_arch, vae_arch
from .keymaps import Plan, Segment, flux_from_diffusers, sd3_from_diffusers, vae_from_diffusers
from .safetensors_io import DTYPE_NAMES
from .sources import CheckpointSource, open_checkpoint

# family -> (module class, architecture from shapes, diffusers source of an official tensor)
_SUPPORTED = {
    "flux": (Flux, flux_arch, flux_from_diffusers),
    "sd3": (MMDiT, sd3_arch, sd3_from_diffusers),
    "vae": (AutoEncoder, vae_arch, vae_from_diffusers),
}
_COMPONENT = {"flux": "transformer", "sd3": "transformer", "vae": "vae"}


def _check_family(source: CheckpointSource, layout: Layout, family: str) -> None:
    if layout.family != family:
        hint = {
            "flux": "load it as a FLUX.1 model (leave family= unset to detect it)",
            "sd3": "load it as an SD3/SD3.5 model (leave family= unset to detect it)",
            "vae": "pass it as the VAE (vae=...), not as the transformer",
            "text_encoder": "pass it as a text encoder, not as the transformer",
        }.get(layout.family, "check that the path points to the transformer weights")
        raise FamilyMismatchError(
            source.path, f"this is {FAMILY_NAMES[layout.family]}, not {FAMILY_NAMES[family]}", hint
        )


def build_plan(model_keys, layout: Layout, source_of, config) -> Plan:
    if layout.naming == "diffusers":
        return {
            k: [dataclasses.replace(s, key=layout.prefix + s.key) for s in source_of(k, config)] for k in model_keys
        }
    return {k: [Segment(layout.prefix + k)] for k in model_keys}


def validate(source: CheckpointSource, layout: Layout, plan: Plan, expected: dict[str, torch.Size]) -> None:
    """Raise for missing, unexpected, mis-shaped or non-float tensors; reads headers only."""
    fix_missing = "the checkpoint is incomplete or of another variant: re-download it or check variant="
    missing = {s.key for segs in plan.values() for s in segs if s.key not in source.key_file}
    if missing:
        raise MissingKeysError(source.path, missing, fix_missing)
    used = {s.key for segs in plan.values() for s in segs}
    prefixed = {layout.prefix + k for k in layout.keys}
    unexpected = (prefixed - used) | set(layout.foreign_keys)
    if unexpected:
        raise UnexpectedKeysError(
            source.path,
            unexpected,
            "these tensors belong to no component fastflow knows; the file may be a fine-tune with "
            "extra layers or a different model: check the file",
        )
    mismatches = {}
    for key, segs in plan.items():
        pieces = [s.shape(source.entry(s.key).shape) for s in segs]
        if any(p is None for p in pieces) or (len(pieces) > 1 and not all(pieces)):
            got = tuple(source.entry(s.key).shape for s in segs)  # cannot be split / joined as needed
        else:
            got = (sum(p[0] for p in pieces), *pieces[0][1:]) if pieces[0] else ()
        if any(p is None or p[1:] != pieces[0][1:] for p in pieces) or tuple(got) != tuple(expected[key]):
            mismatches[key] = (tuple(got), tuple(expected[key]))
        for s in segs:
            if not source.entry(s.key).dtype.is_floating_point:
                raise UnsupportedDtypeError(
                    source.file_of(s.key),
                    f"weight {s.key!r} is {DTYPE_NAMES[source.entry(s.key).dtype]}, not a floating-point type",
                    "use a float checkpoint (quantized files load via fastflow.quant)",
                )
    if mismatches:
        raise ShapeMismatchError(
            source.path,
            mismatches,
            "the checkpoint is of a different size or variant: check variant= / config=",
        )


def materialize(source: CheckpointSource, plan: Plan, expected: dict, dtype, device) -> dict[str, torch.Tensor]:
    """Build each target tensor from its sources, casting on the copy; release pages as we go."""
    state = {}
    for key, segs in plan.items():
        out = torch.empty(expected[key], dtype=dtype, device=device)
        row = 0
        for s in segs:
            src = s.take(source.key_file[s.key].tensor(s.key))
            out[row : row + src.shape[0]].copy_(src)
            row += src.shape[0]
        for s in segs:
            source.key_file[s.key].release(s.key)
        state[key] = out
    return state


def _load(path, component: str, family: str | None, variant, dtype, device, config, prefer=None) -> torch.nn.Module:
    with open_checkpoint(path, component) as source:
        layout = detect_layout(source.key_file, component)
        if family is None and (config is not None or variant is not None):
            family = (config if config is not None else registry.from_name(variant)).family
        if family is None:  # auto: the detected family if this component has it, else the first
            families = [f for f, c in _COMPONENT.items() if c == component]
            family = layout.family if layout.family in families else families[0]
        _check_family(source, layout, family)
        model_cls, arch_of, source_of = _SUPPORTED[family]
        cfg = resolve_config(family, arch_of(source, layout), source, variant, config, layout, prefer)
        with torch.device("meta"):
            model = model_cls(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        plan = build_plan(expected, layout, source_of, cfg)
        validate(source, layout, plan, expected)
        state = materialize(source, plan, expected, dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_transformer(
    path: str | os.PathLike,
    variant: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    config=None,
    family: str | None = None,
) -> torch.nn.Module:
    """Load a transformer from a local safetensors file or diffusers folder.

    ``family`` ("flux" or "sd3") is detected from the tensor names unless given; a checkpoint of
    another family than the one asked for is refused. Accepts official (BFL / SAI) names, ComfyUI
    ``model.diffusion_model.`` prefixed files and diffusers folders (single or sharded).
    ``variant`` names a registered config (needed where the keys cannot tell, e.g.
    ``"flux-kontext-dev"`` vs ``"flux-dev"``); ``config`` describes an unregistered size.
    Returns the model in eval mode with grads off, weights in ``dtype`` on ``device``.
    """
    if family == "vae":
        raise ValueError("use fastflow.loading.load_vae for VAEs")
    return _load(path, "transformer", family, variant, dtype, device, config)


def load_vae(
    path: str | os.PathLike,
    variant: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    config=None,
    prefer: str | None = None,
) -> torch.nn.Module:
    """Load the 16-channel AutoencoderKL from the official ``ae.safetensors``, an SD3 single file
    (``first_stage_model.``), or a diffusers ``AutoencoderKL`` folder (or a pipeline's ``vae/``).

    FLUX and SD3 VAEs have identical tensors and differ in latent scale/shift: a diffusers
    ``config.json`` or an SD3 single file tells which; otherwise pass ``variant="flux-vae"`` or
    ``"sd3-vae"``; ``prefer="flux"`` / ``"sd3"`` settles it for a pipeline that knows its family.
    """
    return _load(path, "vae", "vae", variant, dtype, device, config, prefer)


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    family: str
    naming: str | None
    variant: str | None  # resolved config name, or None when ambiguous / unknown
    candidates: tuple[str, ...]
    dtypes: dict[str, int]  # dtype name -> number of tensors
    num_params: int  # of the transformer tensors
    nbytes: int  # all tensor data in the file(s)
    num_files: int
    other_components: tuple[str, ...]

    def summary(self) -> str:
        lines = [
            f"path:        {self.path}",
            f"family:      {FAMILY_NAMES[self.family]}" + (f" ({self.naming} names)" if self.naming else ""),
            f"variant:     {self.variant or ' or '.join(self.candidates) or 'unknown'}",
            f"dtypes:      {', '.join(f'{k} x{v}' for k, v in sorted(self.dtypes.items()))}",
            f"parameters:  {_human(self.num_params)} ({self.num_params:,})",
            f"size:        {self.nbytes / 2**30:.2f} GiB in {self.num_files} file(s)",
        ]
        if self.other_components:
            lines.append(f"also holds:  {', '.join(self.other_components)}")
        return "\n".join(lines)


def _human(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.3f} M"


def inspect_checkpoint(path: str | os.PathLike, variant: str | None = None) -> CheckpointInfo:
    """Describe a checkpoint from its headers alone (no weights are read)."""
    with open_checkpoint(path) as source:
        layout = detect_layout(source.key_file)
        resolved, candidates = None, ()
        if layout.family in _SUPPORTED:
            _, arch_of, _ = _SUPPORTED[layout.family]
            arch = arch_of(source, layout)
            candidates = tuple(c.name for c in registry.configs_of(layout.family) if c.arch() == arch)
            try:
                resolved = resolve_config(layout.family, arch, source, variant, layout=layout).name
            except ValueError:
                resolved = None
        dtypes: dict[str, int] = {}
        for k in layout.keys:
            name = DTYPE_NAMES[source.entry(layout.prefix + k).dtype]
            dtypes[name] = dtypes.get(name, 0) + 1
        others = sorted({k.split(".")[0] for k in layout.other_keys})
        return CheckpointInfo(
            path=str(path),
            family=layout.family,
            naming=layout.naming,
            variant=resolved,
            candidates=candidates,
            dtypes=dtypes,
            num_params=sum(prod(source.entry(layout.prefix + k).shape) for k in layout.keys),
            nbytes=source.nbytes,
            num_files=len(source.files),
            other_components=tuple(others),
        )
