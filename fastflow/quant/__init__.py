"""Weight quantization: ``quantize_(model, Fp8Config(...))`` swaps ``nn.Linear`` layers for
:class:`Fp8Linear` in place (on real or meta weights), ``quantize_(model, Int8Config())`` for
:class:`Int8Linear` (W8A8 int8: half the memory of bf16); ``dequantize_`` swaps them back.

Layers stay in high precision when their qualified name matches one of the config's ``skip``
``fnmatch`` patterns (the same groups for both formats). The default keeps the embedders and the
final layer in the model dtype (``bench/quality.py --quant fp8 --fp8-study`` measures each choice).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..ops.capability import device_name, fp8_runs_natively
from ..ops.int8_gemm import check_int8_device
from ..ops.reference import FP8_MAX, FP8_MIN_AMAX
from .fp8 import ACTIVATION_SCALINGS, WEIGHT_GRANULARITIES, Fp8Linear, dequantize_weight, quantize_weight
from .int8 import Int8Linear, dequantize_weight_int8, quantize_weight_int8

# Candidate groups of layers to keep in high precision (FLUX and SD3 module names).
SKIP_GROUPS: dict[str, tuple[str, ...]] = {
    "embedders": (
        "img_in",
        "txt_in",
        "time_in.*",
        "vector_in.*",
        "guidance_in.*",
        "context_embedder",
        "t_embedder.*",
        "y_embedder.*",
        "time_embed.*",  # the SDXL UNet's timestep and label embedders
        "label_emb.*",
    ),
    "final": ("final_layer.*",),
    "modulation": ("*_mod.lin", "*.modulation.lin", "*adaLN_modulation.1"),
}
DEFAULT_SKIP_GROUPS = ("embedders", "final")


def skip_patterns(*groups: str) -> tuple[str, ...]:
    unknown = set(groups) - set(SKIP_GROUPS)
    if unknown:
        raise InputError(f"unknown skip groups {sorted(unknown)}; choose from {sorted(SKIP_GROUPS)}")
    return tuple(p for g in groups for p in SKIP_GROUPS[g])


@dataclass(frozen=True)
class Fp8Config:
    """FP8 e4m3 weights and activations.

    weight: "per-channel" (one fp32 scale per output row) or "per-tensor".
    activation: "per-token" (dynamic, one scale per row), "per-tensor" (dynamic) or "static"
    (a calibrated or checkpoint ``scale_input``; see :func:`calibrate_`).
    skip: fnmatch patterns of module names that stay in the model dtype.
    """

    weight: str = "per-channel"
    activation: str = "per-token"
    skip: tuple[str, ...] = skip_patterns(*DEFAULT_SKIP_GROUPS)

    def __post_init__(self):
        if self.weight not in WEIGHT_GRANULARITIES:
            raise InputError(f"Fp8Config.weight={self.weight!r}: choose one of {WEIGHT_GRANULARITIES}")
        if self.activation not in ACTIVATION_SCALINGS:
            raise InputError(f"Fp8Config.activation={self.activation!r}: choose one of {ACTIVATION_SCALINGS}")
        if isinstance(self.skip, str):
            raise InputError("Fp8Config.skip is a tuple of patterns, not one string")

    def skips(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip)

    def describe(self) -> str:
        return f"fp8-e4m3 ({self.weight} weights, {self.activation} activations)"


@dataclass(frozen=True)
class Int8Config:
    """int8 W8A8: symmetric int8 weights with one fp32 scale per output channel, activations
    quantized per token at run time (symmetric, dynamic), the product through the int8 GEMM
    (``torch._int_mm``: a CPU, or a CUDA GPU with sm_80+). ``weight`` and ``activation`` name that
    one scheme (there is no other choice); skip: fnmatch patterns of module names that stay in the
    model dtype, by default the same as :class:`Fp8Config`'s."""

    weight: str = "per-channel"
    activation: str = "per-token"
    skip: tuple[str, ...] = skip_patterns(*DEFAULT_SKIP_GROUPS)

    def __post_init__(self):
        if self.weight != "per-channel":
            raise InputError(f"Int8Config.weight={self.weight!r}: int8 weights are 'per-channel'")
        if self.activation != "per-token":
            raise InputError(f"Int8Config.activation={self.activation!r}: int8 activations are 'per-token'")
        if isinstance(self.skip, str):
            raise InputError("Int8Config.skip is a tuple of patterns, not one string")

    def skips(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip)

    def describe(self) -> str:
        return "int8 (per-channel weights, per-token activations)"


QuantConfig = Fp8Config | Int8Config


def quantizable(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the layers ``quantize_`` would replace."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not config.skips(n)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (e.g. "double_blocks.0.img_attn.qkv") is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` not skipped by ``config`` with an :class:`Fp8Linear` (an
    :class:`Fp8Config`, the default) or an :class:`Int8Linear` (an :class:`Int8Config`), in place;
    returns ``model``. Works on meta models (shapes only) and frees each bf16 weight as it goes.
    int8 layers are refused (InputError) on a CUDA GPU without int8 tensor cores (before sm_80)."""
    config = config or Fp8Config()
    if isinstance(config, Int8Config):
        return _quantize_int8(model, config)
    if not isinstance(config, Fp8Config):
        raise InputError(f"quantize_ takes an Fp8Config or an Int8Config, got {type(config).__name__}")
    names = quantizable(model, config)
    for name in names:
        layer = model.get_submodule(name)
        replace_module(model, name, Fp8Linear.from_linear(layer, config.weight, config.activation))
    devices = {m.weight.device for m in fp8_layers(model).values()}
    slow = [d for d in devices if fp8_runs_natively(d) is False]
    if slow:
        warnings.warn(
            f"{device_name(slow[0])} has no FP8 tensor cores (sm_89+): the FP8 layers will dequantize on every "
            "call; keep this GPU's model in bf16 (dequantize_) for speed",
            stacklevel=2,
        )
    return model


def _quantize_int8(model: nn.Module, config: Int8Config) -> nn.Module:
    names = quantizable(model, config)
    for device in {model.get_submodule(n).weight.device for n in names}:
        check_int8_device(device)  # before any layer is swapped
    for name in names:
        replace_module(model, name, Int8Linear.from_linear(model.get_submodule(name)))
    return model


def dequantize_(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every :class:`Fp8Linear` and :class:`Int8Linear` with an ``nn.Linear`` of the
    dequantized weights (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (Fp8Linear, Int8Linear)):
            replace_module(model, name, module.dequantized(dtype))
    return model


def fp8_layers(model: nn.Module) -> dict[str, Fp8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


def int8_layers(model: nn.Module) -> dict[str, Int8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}


def calibrate_(model: nn.Module, run: Callable[[], object], margin: float = 1.0) -> nn.Module:
    """Switch every :class:`Fp8Linear` to a static activation scale: margin * amax / 448 of the
    activations it sees while ``run()`` executes (e.g. a few generations on calibration prompts).
    Static scales skip the per-token amax pass at inference; layers ``run`` never reaches keep
    their dynamic scaling."""
    layers = fp8_layers(model)
    if not layers:
        raise InputError("calibrate_ needs FP8 layers: quantize_ the model (or load it with quant='fp8') first")
    amax: dict[str, float] = {}

    def recorder(name):
        def hook(module, args):
            amax[name] = max(amax.get(name, 0.0), args[0].detach().abs().amax().float().item())

        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    for name, value in amax.items():
        module = layers[name]
        scale = max(value, FP8_MIN_AMAX) * margin / FP8_MAX
        module.activation = "static"
        module.input_scale = torch.tensor([scale], dtype=torch.float32, device=module.weight.device)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what the weights occupy in memory)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


__all__ = [
    "DEFAULT_SKIP_GROUPS",
    "SKIP_GROUPS",
    "Fp8Config",
    "Fp8Linear",
    "Int8Config",
    "Int8Linear",
    "QuantConfig",
    "calibrate_",
    "dequantize_",
    "dequantize_weight",
    "dequantize_weight_int8",
    "fp8_layers",
    "int8_layers",
    "quantizable",
    "quantize_",
    "quantize_weight",
    "quantize_weight_int8",
    "replace_module",
    "skip_patterns",
    "weight_bytes",
]
