"""Load a transformer checkpoint into our modules: detect, validate everything, then copy.

Order matters for users: every name, shape and dtype is checked against the config before a
single weight byte is read or a tensor allocated. Tensors are then built one at a time from the
memory map straight into their final dtype and device, so peak memory is the loaded model plus
one tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass
from math import prod

import torch
from torch import nn

from ..errors import (
    FamilyMismatchError,
    InputError,
    MissingKeysError,
    ShapeMismatchError,
    UnexpectedKeysError,
    UnsupportedDtypeError,
)
from ..models import configs as registry
from ..models.flux import Flux
from ..models.mmdit import MMDiT
from ..models.unet import UNet
from ..models.vae import AutoEncoder
from ..ops.capability import device_name, fp8_runs_natively
from ..quant import Fp8Config, Fp8Linear, quantizable, replace_module
from ..quant.fp8 import quantize_weight
from .detect import FAMILY_NAMES, Layout, detect_layout, flux_arch, resolve_config, sd3_arch, unet_arch, vae_arch
from .keymaps import Plan, Segment, flux_from_diffusers, sd3_from_diffusers, unet_from_diffusers, vae_from_diffusers
from .quantized import FP8_DTYPES, Fp8Source, describe, read_fp8_source
from .safetensors_io import DTYPE_NAMES
from .sources import CheckpointSource, open_checkpoint

# family -> (module class, architecture from shapes, diffusers source of an official tensor)
_SUPPORTED = {
    "flux": (Flux, flux_arch, flux_from_diffusers),
    "sd3": (MMDiT, sd3_arch, sd3_from_diffusers),
    "sdxl": (UNet, unet_arch, unet_from_diffusers),
    "vae": (AutoEncoder, vae_arch, vae_from_diffusers),
}
_COMPONENT = {"flux": "transformer", "sd3": "transformer", "sdxl": "transformer", "vae": "vae"}


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Random initialisation is a no-op on the meta device (the checkpoint supplies every value);
    skipping it also keeps ``normal_``'s Python meta kernel from importing torch._dynamo (1.4 s
    of every CLI run)."""

    INIT = frozenset(
        {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_}
        | {getattr(nn.init, name) for name in ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "ones_")}
        | {getattr(nn.init, name) for name in ("kaiming_normal_", "xavier_uniform_", "zeros_", "constant_")}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.INIT:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta():
    """Build modules on the meta device, skipping their random initialisation."""
    with torch.device("meta"), _SkipInit():
        yield


def _check_family(source: CheckpointSource, layout: Layout, family: str) -> None:
    if layout.family != family:
        hint = {
            "flux": "load it as a FLUX.1 model (leave family= unset to detect it)",
            "sd3": "load it as an SD3/SD3.5 model (leave family= unset to detect it)",
            "sdxl": "load it as an SDXL model: fastflow.load(path) detects it (leave family= unset)",
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
                    "use a float or FP8 checkpoint: integer-quantized weights (int8 / int4, GGUF, bitsandbytes) "
                    "are not supported; `fastflow quantize` makes an FP8 file from a float one",
                )
    if mismatches:
        raise ShapeMismatchError(
            source.path,
            mismatches,
            "the checkpoint is of a different size or variant: check variant= / config=",
        )


def _assemble(source: CheckpointSource, segs, shape, dtype, device, fp8: Fp8Source) -> torch.Tensor:
    """One target tensor from its source pieces, FP8 pieces dequantized (codes x scale) on the copy."""
    out = torch.empty(shape, dtype=dtype, device=device)
    row = 0
    for s in segs:
        src = s.take(fp8.dequantized(s.key, source.key_file[s.key].tensor(s.key)))
        out[row : row + src.shape[0]].copy_(src)
        row += src.shape[0]
    return out


def _passthrough(source: CheckpointSource, segs, layer: Fp8Linear, fp8: Fp8Source):
    """The file's e4m3 codes and scale as the layer holds them, when no arithmetic is needed
    (one whole e4m3 source; a per-tensor scale serves a per-channel layer by repetition)."""
    one = len(segs) == 1 and segs[0].half is None and not segs[0].transpose
    if not one or source.entry(segs[0].key).dtype != torch.float8_e4m3fn:
        return None
    key = segs[0].key
    scale = fp8.weight_scales.get(key, torch.ones(1))
    rows = layer.out_features
    if layer.weight_granularity == "per-channel":
        scale = scale.expand(rows).clone() if scale.numel() == 1 else scale
    elif scale.numel() != 1:
        return None
    return source.key_file[key].tensor(key), scale


def materialize(
    source: CheckpointSource, plan: Plan, expected: dict, dtype, device, fp8: Fp8Source | None = None, fp8_layers=None
) -> dict[str, torch.Tensor]:
    """Build each target tensor from its sources, casting on the copy; release pages as we go.

    ``fp8_layers`` (weight key -> Fp8Linear on meta) are filled with e4m3 codes and scales: the
    file's own where they fit the layer, else quantized from the assembled tensor (in ``dtype``,
    or fp32 when the source is FP8). Peak memory: the loaded model plus one assembled tensor."""
    state = {}
    fp8 = fp8 or Fp8Source.empty()
    fp8_layers = fp8_layers or {}
    for key, segs in plan.items():
        layer = fp8_layers.get(key)
        if layer is None:
            state[key] = _assemble(source, segs, expected[key], dtype, device, fp8)
        else:
            stem = key[: -len("weight")]
            found = _passthrough(source, segs, layer, fp8)
            if found is not None:  # views of the map (and the checked scale): copy
                found = found[0].to(device, copy=True), found[1].to(device, copy=True)
            else:
                from_fp8 = any(source.entry(s.key).dtype in FP8_DTYPES for s in segs)
                full = _assemble(source, segs, expected[key], torch.float32 if from_fp8 else dtype, device, fp8)
                found = quantize_weight(full, layer.weight_granularity)
                del full
            state[key], state[stem + "weight_scale"] = found
            if layer.activation == "static":
                state[stem + "input_scale"] = layer.input_scale.to(device, copy=True)
        for s in segs:
            source.key_file[s.key].release(s.key)
    return state


def _quant_config(quant) -> Fp8Config | str | None:
    if quant is None or isinstance(quant, Fp8Config):
        return quant
    if quant == "fp8":
        return Fp8Config()
    if quant == "none":
        return "none"
    raise InputError(f"quant={quant!r}: use None (keep the file's format), 'fp8', 'none' or an Fp8Config")


def _fp8_layers(model: nn.Module, layout: Layout, fp8: Fp8Source, quant, dtype) -> dict[str, Fp8Linear]:
    """Swap the meta model's linear layers for Fp8Linear where the weights will be FP8: per ``quant``
    (an Fp8Config), or, with quant None, where the file stores them in FP8 (granularity and static
    activation scales as the file has them). Returns weight key -> layer."""
    if quant == "none" or (quant is None and not fp8.quantized):
        return {}
    if layout.naming == "diffusers" and quant is None:
        quant = Fp8Config()  # diffusers names: fused layers come from several sources; requantize
    if quant is None:  # the layers the file stores in FP8
        names = [
            n
            for n, m in model.named_modules()
            if type(m) is nn.Linear and layout.prefix + n + ".weight" in fp8.fp8_weights
        ]
    else:
        names = quantizable(model, quant)
    chosen = {}
    for name in names:
        module = model.get_submodule(name)
        weight_key = layout.prefix + name + ".weight"
        static = fp8.input_scales.get(weight_key)
        if quant is None:
            scale = fp8.weight_scales.get(weight_key)
            granularity = "per-channel" if scale is not None and scale.numel() > 1 else "per-tensor"
            activation = "static" if static is not None else (fp8.activation or "per-token")
        else:
            granularity, activation = quant.weight, quant.activation
            if activation == "static" and static is None:
                raise InputError(
                    f"layer {name!r} has no static input scale in the file; quantize with per-token activations, "
                    "fastflow.quant.calibrate_(model, run) to set static scales"
                )
        layer = Fp8Linear(
            module.in_features, module.out_features, module.bias is not None, granularity, activation, dtype, "meta"
        )
        if activation == "static":
            layer.input_scale = static.reshape(1).clone()
        replace_module(model, name, layer)
        chosen[name + ".weight"] = layer
    return chosen


def _load(
    path, component: str, family: str | None, variant, dtype, device, config, prefer=None, quant=None
) -> torch.nn.Module:
    with open_checkpoint(path, component) as source:
        layout = detect_layout(source.key_file, component)
        if family is None and (config is not None or variant is not None) and not isinstance(config, dict):
            family = (config if config is not None else registry.from_name(variant)).family
        if family is None:  # auto: the detected family if this component has it, else the first
            families = [f for f, c in _COMPONENT.items() if c == component]
            family = layout.family if layout.family in families else families[0]
        _check_family(source, layout, family)
        model_cls, arch_of, source_of = _SUPPORTED[family]
        cfg = resolve_config(family, arch_of(source, layout), source, variant, config, layout, prefer)
        with on_meta():
            model = model_cls(cfg)
        fp8 = read_fp8_source(source, layout.prefix, layout.quant_keys)
        quant = _quant_config(quant) if component == "transformer" else "none"  # FP8 VAE files: dequantized
        if quant != "none" and (quant is not None or fp8.quantized) and fp8_runs_natively(device) is False:
            warnings.warn(
                f"{device_name(device)} has no FP8 tensor cores (FP8 GEMMs need sm_89 or newer): "
                f"the weights are loaded dequantized to {dtype} instead",
                stacklevel=3,
            )
            quant = "none"
        fp8_layers = _fp8_layers(model, layout, fp8, quant, dtype)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        aux = {k for k in expected if k.endswith((".weight_scale", ".input_scale"))}
        plan = build_plan([k for k in expected if k not in aux], layout, source_of, cfg)
        validate(source, layout, plan, expected)
        state = materialize(source, plan, expected, dtype, device, fp8, fp8_layers)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


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
    ``quant``: None keeps the file's format (FP8 layers stay FP8, see :mod:`.quantized`); "fp8" or an
    :class:`~fastflow.quant.Fp8Config` quantizes at load, tensor by tensor; "none" dequantizes.
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
            quant=describe(source, layout.prefix, layout.keys, layout.quant_keys),
        )
