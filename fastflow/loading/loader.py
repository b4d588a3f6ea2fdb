"""Loading's orchestration: one pass down the stages, never back.

    path --source--> CheckpointSource --describe--> Description --make_plan--> LoadPlan --materialize--> module

:func:`load_transformer` / :func:`load_vae` run them in order (``quant`` goes to the plan stage
only); :func:`inspect_checkpoint` runs the first two, on headers alone, without failing on an
ambiguous or unknown variant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import prod

import torch

from ..models import configs as registry
from .describe import describe, detect_layout
from .families import FAMILIES, FAMILY_NAMES
from .materialize import materialize
from .plan import make_plan
from .quantized import describe as describe_quant
from .safetensors_io import DTYPE_NAMES
from .source import open_checkpoint
from .variant import resolve_config


def _load(
    path, component: str, family: str | None, variant, dtype, device, config, prefer=None, quant=None
) -> torch.nn.Module:
    with open_checkpoint(path, component) as source:
        description = describe(source, component, family, variant, config, prefer)
        plan = make_plan(source, description, dtype, device, quant if component == "transformer" else "none")
        return materialize(source, plan)


def load_transformer(
    path: str | os.PathLike,
    variant: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    config=None,
    family: str | None = None,
    quant=None,
) -> torch.nn.Module:
    """Load a transformer from a local safetensors file or diffusers folder.

    ``family`` ("flux" or "sd3") is detected from the tensor names unless given; a checkpoint of
    another family than the one asked for is refused. Accepts official (BFL / SAI) names, ComfyUI
    ``model.diffusion_model.`` prefixed files and diffusers folders (single or sharded).
    ``variant`` names a registered config (needed where the keys cannot tell, e.g.
    ``"flux-kontext-dev"`` vs ``"flux-dev"``); ``config`` describes an unregistered size: a
    FluxConfig / MMDiTConfig, or a dict of its fields (the rest: the full-size model's values). A
    diffusers folder whose size is not registered is described by its own ``config.json``.
    ``quant``: None keeps the file's format (FP8 / int8 layers stay so, see :mod:`.quantized`); "fp8"
    / "int8" or an :class:`~fastflow.quant.Fp8Config` / ``Int8Config`` quantizes at load, tensor by
    tensor; "none" dequantizes.
    On a CUDA GPU without FP8 tensor cores FP8 weights are dequantized, with a warning.
    Returns the model in eval mode with grads off, weights in ``dtype`` on ``device``.
    """
    if family == "vae":
        raise ValueError("use fastflow.loading.load_vae for VAEs")
    return _load(path, "transformer", family, variant, dtype, device, config, quant=quant)


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


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n} B"


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
    quant: str | None = None  # the FP8 format, None for a float checkpoint

    def summary(self) -> str:
        lines = [
            f"path:        {self.path}",
            f"family:      {FAMILY_NAMES[self.family]}" + (f" ({self.naming} names)" if self.naming else ""),
            f"variant:     {self.variant or ' or '.join(self.candidates) or 'unknown'}",
            f"dtypes:      {', '.join(f'{k} x{v}' for k, v in sorted(self.dtypes.items()))}",
            f"quant:       {self.quant or 'none (float weights)'}",
            f"parameters:  {_human(self.num_params)} ({self.num_params:,})",
            f"size:        {human_bytes(self.nbytes)} in {self.num_files} file(s)",
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
        if layout.family in FAMILIES:
            arch = FAMILIES[layout.family].arch(source, layout)
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
            quant=describe_quant(source, layout.prefix, layout.keys, layout.quant_keys),
        )
