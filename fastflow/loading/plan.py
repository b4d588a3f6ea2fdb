"""Stage 3 of loading, the plan: a :class:`~.describe.Description` (and ``quant``, ``dtype``,
``device``) -> a :class:`LoadPlan`: the module built on the meta device, with Fp8Linear where the
weights will be FP8, and for each of its tensors the checkpoint pieces it is assembled from.

Order matters for users: every name, shape and dtype is checked against the module before a
single weight byte is read or a tensor allocated (:func:`validate`); only the FP8 scales are read
here (they are checked too). The quantization decision: ``quant`` (None keeps the file's format,
"fp8" / an Fp8Config quantizes, "none" dequantizes), the file's FP8 layers, and whether the device
has FP8 tensor cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError, MissingKeysError, ShapeMismatchError, UnexpectedKeysError, UnsupportedDtypeError
from ..ops.capability import device_name, fp8_runs_natively, int8_runs_natively
from ..ops.int8_gemm import check_int8_device
from ..quant import Fp8Config, Fp8Linear, Int8Config, Int8Linear, quantizable, replace_module
from .describe import Description
from .keymaps import Plan, Segment
from .layout import Layout
from .quantized import Fp8Source, read_fp8_source
from .safetensors_io import DTYPE_NAMES
from .source import CheckpointSource


@dataclass(frozen=True)
class LoadPlan:
    """What :mod:`.materialize` builds, where, and from which pieces of the checkpoint."""

    model: nn.Module  # on the meta device; its state_dict keys are ``keys``' and the FP8 scales
    keys: Plan  # target tensor -> its source pieces (checkpoint keys), validated
    expected: dict[str, torch.Size]  # target tensor -> shape
    dtype: torch.dtype
    device: str | torch.device
    fp8: Fp8Source = field(default_factory=Fp8Source.empty)  # the file's FP8 scales
    fp8_layers: dict[str, Fp8Linear | Int8Linear] = field(default_factory=dict)  # weight key -> layer to fill


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


def build_plan(model_keys, layout: Layout, source_of, config) -> Plan:
    if layout.naming == "diffusers":
        return {
            k: [dataclasses.replace(s, key=layout.prefix + s.key) for s in source_of(k, config)] for k in model_keys
        }
    return {k: [Segment(layout.prefix + k)] for k in model_keys}


def validate(
    source: CheckpointSource, layout: Layout, plan: Plan, expected: dict[str, torch.Size], int8=frozenset()
) -> None:
    """Raise for missing, unexpected, mis-shaped or non-float tensors (``int8``: the int8 weights a
    fastflow int8 file holds with their scales); reads headers only."""
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
            if not source.entry(s.key).dtype.is_floating_point and s.key not in int8:
                raise UnsupportedDtypeError(
                    source.file_of(s.key),
                    f"weight {s.key!r} is {DTYPE_NAMES[source.entry(s.key).dtype]}, not a floating-point type",
                    "use a float or FP8 checkpoint: integer-quantized weights (int8 / int4, GGUF, bitsandbytes) "
                    "other than fastflow's own are not supported; `fastflow quantize` makes an FP8 or int8 file "
                    "from a float one",
                )
    if mismatches:
        raise ShapeMismatchError(
            source.path,
            mismatches,
            "the checkpoint is of a different size or variant: check variant= / config=",
        )


def _quant_config(quant) -> Fp8Config | Int8Config | str | None:
    if quant is None or isinstance(quant, (Fp8Config, Int8Config)):
        return quant
    if quant == "fp8":
        return Fp8Config()
    if quant == "int8":
        return Int8Config()
    if quant == "none":
        return "none"
    raise InputError(
        f"quant={quant!r}: use None (keep the file's format), 'fp8', 'int8', 'none', an Fp8Config or an Int8Config"
    )


def _fp8_layers(model: nn.Module, layout: Layout, fp8: Fp8Source, quant, dtype) -> dict[str, Fp8Linear | Int8Linear]:
    """Swap the meta model's linear layers for Fp8Linear / Int8Linear where the weights will be FP8
    / int8: per ``quant`` (an Fp8Config / Int8Config), or, with quant None, where the file stores
    them so (FP8 granularity and static activation scales as the file has them). Returns weight key
    -> layer."""
    if quant == "none" or (quant is None and not fp8.quantized):
        return {}
    if layout.naming == "diffusers" and quant is None:  # fused layers come from several sources: requantize
        quant = Int8Config() if fp8.int8_weights else Fp8Config()
    if quant is None:  # the layers the file stores in FP8 / int8
        stored = fp8.fp8_weights | fp8.int8_weights
        names = [
            n for n, m in model.named_modules() if type(m) is nn.Linear and layout.prefix + n + ".weight" in stored
        ]
    else:
        names = quantizable(model, quant)
    chosen = {}
    for name in names:
        module = model.get_submodule(name)
        weight_key = layout.prefix + name + ".weight"
        if isinstance(quant, Int8Config) or (quant is None and weight_key in fp8.int8_weights):
            layer = Int8Linear(module.in_features, module.out_features, module.bias is not None, dtype, "meta")
            replace_module(model, name, layer)
            chosen[name + ".weight"] = layer
            continue
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


def _int8_device(quant, fp8: Fp8Source, device, dtype):
    """int8 asked for on a device without an int8 GEMM: refused (InputError); an int8 file there
    loads dequantized, with a warning (as an FP8 file does on a GPU without FP8 tensor cores)."""
    if int8_runs_natively(device) is not False:
        return quant
    if isinstance(quant, Int8Config):
        check_int8_device(device)  # raises, saying what to use
    if quant is None and fp8.int8_weights:
        warnings.warn(
            f"{device_name(device)} has no int8 tensor cores (torch._int_mm needs sm_80 or newer): "
            f"the int8 weights are loaded dequantized to {dtype} instead",
            stacklevel=5,
        )
        return "none"
    return quant


def make_plan(source: CheckpointSource, description: Description, dtype, device, quant=None) -> LoadPlan:
    """The module on meta, its FP8 layers and its validated key plan. ``quant`` "none" for a
    component loaded in float whatever the file holds (FP8 VAE files: dequantized)."""
    layout, cfg = description.layout, description.config
    with on_meta():
        model = description.spec.model(cfg)
    fp8 = read_fp8_source(source, layout.prefix, layout.quant_keys)
    quant = _quant_config(quant)
    quant = _int8_device(quant, fp8, device, dtype)
    fp8_wanted = isinstance(quant, Fp8Config) or (quant is None and fp8.fp8_weights)
    if fp8_wanted and fp8_runs_natively(device) is False:
        warnings.warn(
            f"{device_name(device)} has no FP8 tensor cores (FP8 GEMMs need sm_89 or newer): "
            f"the weights are loaded dequantized to {dtype} instead",
            stacklevel=4,
        )
        quant = "none"
    fp8_layers = _fp8_layers(model, layout, fp8, quant, dtype)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    aux = {k for k in expected if k.endswith((".weight_scale", ".input_scale"))}
    keys = build_plan([k for k in expected if k not in aux], layout, description.spec.key_map, cfg)
    validate(source, layout, keys, expected, fp8.int8_weights)
    return LoadPlan(model, keys, expected, dtype, device, fp8, fp8_layers)
