"""LoRA adapters on fastflow transformers, unfused or fused.

* Unfused (default): each targeted layer is wrapped in a :class:`LoraLinear`, which runs the base
  layer (nn.Linear, FP8) through :func:`fastflow.ops.linear` and adds ``up @ (down @ x) * scale``.
  All adapters of a layer are stacked into one down [R, in] / up [out, R] pair with a per-rank
  scale vector, a buffer: changing scales (switching adapters on and off) changes values only, so
  a compiled model does not recompile.
* Fused: the deltas are added into the weights (FP8 weights dequantized, summed in fp32 and
  re-quantized); the original weights are kept in CPU memory, so unfusing restores them bit for
  bit. No cost per step.

The math is PEFT's (what diffusers' ``load_lora_weights`` runs): ``base(x) + B(A(x)) * alpha / r``
per adapter times its scale.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, LoraError, plain_number
from ..quant import replace_module
from . import control as control_lora
from .formats import is_other_component, linear_layers, parse
from .formats_sdxl import metadata_alphas, refuse_text_encoder_keys
from .layers import LoraLinear, Piece


@dataclass
class Adapter:
    name: str
    path: Path
    targets: dict[str, list[Piece]]
    scale: float
    fused: bool
    unmatched: list[str] = field(default_factory=list)
    control: control_lora.ControlParts | None = None  # a FLUX.1 Canny / Depth LoRA's norms and img_in width


class LoraManager:
    """The adapters of one model; what ``pipe.load_lora`` & co. call."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, Adapter] = {}
        self._originals: dict[str, dict[str, torch.Tensor]] = {}  # layer -> its weights before fusing (CPU)

    # -- loading ---------------------------------------------------------------------------------
    def load(
        self,
        path,
        scale: float = 1.0,
        name: str | None = None,
        fuse: bool = False,
        on_control=None,
        text_encoder: str = "warn",
    ) -> Adapter:
        """Load one LoRA file. ``on_control(parts)``: called for a control LoRA (adapters/control.py)
        before anything changes, to refuse it with a typed error. ``text_encoder``: what the file's
        text-encoder keys do ("warn": listed in a warning, not applied; "refuse": a LoraError
        naming them, nothing loaded)."""
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"load_lora takes the path of a .safetensors LoRA file, got {type(path).__name__}")
        path = Path(path).expanduser()
        name = name or path.stem
        if name in self.adapters:
            raise InputError(f"a LoRA named {name!r} is already loaded: pass name=, or unload_lora({name!r}) first")
        scale = _check_scale(scale)
        state, metadata = read_lora_file(path, with_metadata=True)
        state.update(metadata_alphas(state, metadata, path))
        control = control_lora.split(state, self.model, path)  # takes a control LoRA's norms out of state
        if control is not None:
            control.hint = control_lora.hint(path)
            self._check_control(control, path)
            if on_control is not None:
                on_control(control)
        targets, unmatched = parse(state, self.model, path, self._widths(control))
        if text_encoder == "refuse":
            refuse_text_encoder_keys(unmatched, path)
        if unmatched:
            other = [k for k in unmatched if is_other_component(k)]
            warnings.warn(
                f"{path.name}: {len(unmatched)} LoRA key(s) match no layer of the transformer and were not applied"
                + (f" ({len(other)} are text-encoder keys, not supported yet)" if other else "")
                + ": "
                + ", ".join(unmatched[:8])
                + (" ..." if len(unmatched) > 8 else ""),
                UserWarning,
                stacklevel=3,
            )
        adapter = Adapter(name, path, targets, scale, fuse, unmatched, control)
        if control is not None:
            control_lora.apply(control, self.model)
        self.adapters[name] = adapter
        if fuse:
            self._refuse(set(targets))
        else:
            for target, pieces in targets.items():
                self._wrapped(target).add(name, pieces, scale)
        return adapter

    # -- scales, fusing, unloading ----------------------------------------------------------------
    def set_scales(self, scales: dict[str, float]) -> None:
        if not isinstance(scales, dict):
            raise InputError(f"LoRA scales must be a dict of name -> scale, got {type(scales).__name__}")
        self._names(list(scales))
        refuse = set()
        for name, scale in scales.items():
            adapter = self.adapters[name]
            adapter.scale = _check_scale(scale)
            if adapter.fused:
                refuse |= set(adapter.targets)
            else:
                for target in adapter.targets:
                    self._layer(target).set_scale(name, adapter.scale)
        if refuse:
            self._refuse(refuse)

    def unload(self, name: str | None = None) -> None:
        names = sorted(self._names(name), key=lambda n: self.adapters[n].control is not None)  # control last
        for n in names:
            if self.adapters[n].control is not None and self.adapters[n].control.width is not None:
                kept = [a.name for a in self.adapters.values() if a.name not in names and "img_in" in a.targets]
                if kept:
                    raise InputError(f"LoRA {kept[0]!r} also changes img_in, which unloading {n!r} narrows back: "
                                     f"unload {kept[0]!r} first (or all LoRAs at once)")  # fmt: skip
        for n in names:
            adapter = self.adapters.pop(n)
            if adapter.fused:
                self._refuse(set(adapter.targets))
            else:
                for target in adapter.targets:
                    layer = self._layer(target)
                    layer.remove(n)
                    if not layer.pieces:
                        replace_module(self.model, target, layer.base)
            if adapter.control is not None:
                control_lora.restore(adapter.control, self.model)

    def set_fused(self, fused: bool, names=None) -> None:
        """Move adapters between the fused and the unfused form (same outputs, up to rounding)."""
        touched = set()
        for name in self._names(names or None):  # [] or None: all
            adapter = self.adapters[name]
            if adapter.fused == fused:
                continue
            adapter.fused = fused
            touched |= set(adapter.targets)
            for target, pieces in adapter.targets.items():
                if fused:
                    layer = self._layer(target)
                    layer.remove(name)
                    if not layer.pieces:
                        replace_module(self.model, target, layer.base)
                else:
                    self._wrapped(target).add(name, pieces, adapter.scale)
        self._refuse(touched)

    # -- internals ---------------------------------------------------------------------------------
    def control(self) -> Adapter | None:
        """The loaded control LoRA (adapters/control.py), if any."""
        return next((a for a in self.adapters.values() if a.control is not None), None)

    def _check_control(self, parts: control_lora.ControlParts, path) -> None:
        loaded = self.control()
        if loaded is not None:
            raise LoraError(path, f"a control LoRA ({loaded.name!r}: img_in and norm scales) is already loaded",
                            f"unload_lora({loaded.name!r}) first: one control LoRA at a time")  # fmt: skip
        if parts.width is None:
            return
        holders = [a.name for a in self.adapters.values() if "img_in" in a.targets]
        if holders or type(self.model.img_in) is not nn.Linear:
            why = f"LoRA {holders[0]!r} targets img_in" if holders else "img_in is quantized"
            raise LoraError(path, f"this control LoRA widens img_in, but {why}",
                            "load the control LoRA first, or unload that LoRA / load the model with img_in "
                            "unquantized (the default skip groups keep it so)")  # fmt: skip

    def _widths(self, parts) -> dict[str, tuple[int, int]]:
        """img_in's (width once loaded, width before) while a control LoRA widens it (formats.parse)."""
        if parts is None or parts.width is None:
            loaded = self.control()
            parts = None if loaded is None else loaded.control
        if parts is None or parts.width is None:
            return {}
        return {"img_in": (parts.width, parts.narrow)}

    def _names(self, names) -> list[str]:
        """``names`` (None: all; a name; a list of names) checked to be loaded LoRAs."""
        names = list(self.adapters) if names is None else [names] if isinstance(names, str) else names
        try:
            names = list(names)
        except TypeError:
            raise InputError(f"LoRA names must be a name or a list of names, got {names!r}") from None
        for n in names:
            if not isinstance(n, str) or n not in self.adapters:
                raise InputError(f"no LoRA named {n!r} is loaded (loaded: {sorted(self.adapters)})")
        return names

    def _layer(self, target: str) -> nn.Module:
        return self.model.get_submodule(target)

    def _wrapped(self, target: str) -> LoraLinear:
        layer = self._layer(target)
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer)
            replace_module(self.model, target, layer)
        return layer

    def _base(self, target: str) -> nn.Module:
        layer = self._layer(target)
        return layer.base if isinstance(layer, LoraLinear) else layer

    def _refuse(self, targets: set[str]) -> None:
        """Recompute each target's weights from its originals plus every fused adapter's delta."""
        for target in sorted(targets):
            base = self._base(target)
            fused = [a for a in self.adapters.values() if a.fused and target in a.targets]
            original = self._originals.get(target)
            if original is None:
                if not fused:
                    continue
                original = {k: getattr(base, k).detach().to("cpu", copy=True) for k in _weight_names(base)}
                self._originals[target] = original
            if not fused:
                for k, v in original.items():
                    getattr(base, k).data = v.to(getattr(base, k).device)
                del self._originals[target]
                continue
            _fuse_into(base, original, [(a.targets[target], a.scale) for a in fused])


def _weight_names(layer: nn.Module) -> tuple[str, ...]:
    names = ("weight", "weight_scale") if hasattr(layer, "weight_scale") else ("weight",)
    return (*names, "bias") if getattr(layer, "bias", None) is not None else names


def _fuse_into(layer: nn.Module, original: dict[str, torch.Tensor], adapters) -> None:
    """layer's weights = original + sum of scale * up @ down (fp32 sum, one rounding; FP8 layers
    dequantized and re-quantized with the same granularity)."""
    from ..quant.fp8 import dequantize_weight, quantize_weight

    device = layer.weight.device
    if "weight_scale" in original:
        w = dequantize_weight(original["weight"].to(device), original["weight_scale"].to(device), torch.float32)
    else:
        w = original["weight"].to(device, torch.float32, copy=True)
    for pieces, scale in adapters:
        for p in pieces:
            rows = slice(p.row, p.row + p.up.shape[0])
            w[rows] += (p.scale * scale) * (p.up.to(device, torch.float32) @ p.down.to(device, torch.float32))
    if "weight_scale" in original:
        q, s = quantize_weight(w, layer.weight_granularity)
        layer.weight.data, layer.weight_scale = q, s
    else:
        layer.weight.data = w.to(original["weight"].dtype)
    biased = [(p, scale) for pieces, scale in adapters for p in pieces if p.bias is not None]
    if biased:  # lora_B biases (control LoRAs): into the layer's bias, summed in fp32
        b = original["bias"].to(device, torch.float32, copy=True)
        for p, scale in biased:
            b[p.row : p.row + p.bias.shape[0]] += (p.scale * scale) * p.bias.to(device, torch.float32)
        layer.bias.data = b.to(original["bias"].dtype)
    elif "bias" in original:
        layer.bias.data = original["bias"].to(device)


def _check_scale(scale) -> float:
    scale = plain_number(scale)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not -100 <= scale <= 100:
        raise InputError(f"a LoRA scale must be a number from -100 to 100, got {scale!r}")
    return float(scale)


def read_lora_file(path: Path, with_metadata: bool = False):
    """Every tensor of a LoRA safetensors file, through the validated reader (never pickle); with
    ``with_metadata``, (tensors, the header's metadata)."""
    from ..loading.safetensors_io import SafetensorsFile

    with SafetensorsFile(path) as f:
        state = {k: f.tensor(k).clone() for k in f.entries}
        return (state, dict(f.metadata)) if with_metadata else state


__all__ = ["LoraLinear", "LoraManager", "linear_layers"]
