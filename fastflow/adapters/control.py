"""FLUX.1 control LoRAs (BFL's FLUX.1-Canny-dev-lora and FLUX.1-Depth-dev-lora) on FLUX.1 dev.

BFL made them with their ``FluxLoraWrapper`` (black-forest-labs/flux, ``modules/lora.py``): every
linear layer of the model wrapped at rank min(128, in, out), ``lora_B`` with a bias, scale 1. The
files hold, on official names: ``<layer>.lora_A.weight`` [r, in], ``<layer>.lora_B.weight``
[out, r] and ``<layer>.lora_B.bias`` [out] for every linear layer (img_in's ``lora_A`` 128 wide:
the noise and the control image's latents), and whole QK-norm scales
``double_blocks.N.{img,txt}_attn.norm.{query,key}_norm.scale`` and
``single_blocks.N.norm.{query,key}_norm.scale`` [head_dim] that replace the model's. diffusers'
names for the same (``transformer.x_embedder.lora_A.weight``, ``...attn.norm_q.weight``,
``norm_added_k``, ...) are read too.

Loading one does what diffusers' ``FluxLoraLoaderMixin.load_lora_weights`` does:

* img_in becomes a linear layer of the LoRA's input width, dev's weights in its first columns and
  zeros in the new ones (``_maybe_expand_transformer_param_shape_or_error_``); a LoRA loaded later
  whose img_in ``lora_A`` has dev's width gets zero columns too (``_maybe_expand_lora_state_dict``);
* the norm scales are copied into the model as weights: the LoRA scale does not scale them and
  fusing does not change them (``_load_norm_into_transformer``);
* the low-rank parts (with their biases) are an ordinary adapter: unfused, fused, scales switched.

Unloading puts the original img_in module and norm scales back, bit for bit (diffusers' unload
with ``reset_to_overwritten_params=True``). What the model becomes (FLUX.1 Canny or Depth: config,
sampling defaults) is the pipeline's business (pipelines/lora.py); :func:`hint` gives it the text
that names the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraError
from ..loading.keymaps import flux_from_diffusers
from ..quant import replace_module
from .formats import MAX_LORA_VALUE, _strip

NORMS = (".query_norm.scale", ".key_norm.scale")  # our (official) QK-norm parameters
_IMG_IN_DOWN = ("img_in.lora_A.weight", "x_embedder.lora_A.weight", "img_in.lora_down.weight")


@dataclass
class ControlParts:
    """What a control LoRA holds beyond low-rank pairs, and what loading it replaced."""

    norms: dict[str, torch.Tensor]  # our parameter name -> the file's tensor
    width: int | None  # img_in's inputs once loaded (None: the LoRA does not widen it)
    narrow: int  # img_in's inputs before
    hint: str = ""  # the file's name and metadata, lower case (Canny or Depth)
    saved_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    saved_img_in: nn.Module | None = None


def _norm_names(model: nn.Module) -> dict[str, str]:
    """File name (official or diffusers) -> our parameter, for every QK-norm scale of a FLUX model."""
    out = {}
    for name, _ in model.named_parameters():
        if name.endswith(NORMS):
            out[name] = name
            for seg in flux_from_diffusers(name, model.config):
                out[seg.key] = name
    return out


def split(state: dict[str, torch.Tensor], model: nn.Module, path) -> ControlParts | None:
    """The control parts of a LoRA file's ``state`` (its norm tensors are taken out of ``state``),
    or None for an ordinary LoRA. Typed errors for a norm of another shape, non-finite or out of
    range values, and an img_in width that is not FLUX.1 Canny / Depth's (twice the output)."""
    if model.config.family != "flux":
        return None
    names = _norm_names(model)
    norms = {}
    for key in list(state):
        ours = names.get(_strip(key))
        if ours is None:
            continue
        tensor, param = state[key], model.get_parameter(ours)
        if not tensor.is_floating_point() or tensor.shape != param.shape:
            raise LoraError(path, f"norm scale {key!r} is {str(tensor.dtype).removeprefix('torch.')} "
                            f"{list(tensor.shape)}, but {ours} is a float {list(param.shape)}",
                            "this LoRA was made for another model size, or the file is corrupt")  # fmt: skip
        if not torch.isfinite(tensor.float()).all() or tensor.float().abs().max() > MAX_LORA_VALUE:
            raise LoraError(path, f"norm scale {key!r} holds NaN, inf or |values| beyond {MAX_LORA_VALUE:g}",
                            "the file is corrupt: re-download it")  # fmt: skip
        if ours in norms:
            raise LoraError(path, f"two keys of this file set {ours} (one is {key!r})", "keep one of them")
        norms[ours] = state.pop(key)
    narrow = model.img_in.weight.shape[1]  # a LoraLinear's weight is its base's
    downs = [state[k] for k in state if _strip(k) in _IMG_IN_DOWN and state[k].dim() == 2]
    width = downs[0].shape[1] if downs and downs[0].shape[1] > narrow else None
    if width is not None and (narrow != model.config.out_channels or width != 2 * narrow):
        raise LoraError(path, f"img_in's lora_A is {width} wide but the model's img_in reads {narrow} inputs",
                        "control LoRAs widen FLUX.1 dev's img_in to twice its width (FLUX.1 Canny / Depth): "
                        "load it on FLUX.1 dev")  # fmt: skip
    if not norms and width is None:
        return None
    return ControlParts(norms, width, narrow)


def hint(path: Path) -> str:
    """The file's name and the metadata values that name a model, lower case (Canny or Depth)."""
    from ..loading.safetensors_io import SafetensorsFile

    with SafetensorsFile(path) as f:
        metadata = f.metadata
    named = [v for k, v in metadata.items() if k.startswith("modelspec.") or k in ("name", "model", "ss_output_name")]
    return " ".join([path.name, *named]).lower()


def apply(parts: ControlParts, model: nn.Module) -> None:
    """Copy the norm scales in (keeping the originals) and widen img_in (keeping the original
    module). img_in must be a plain linear layer: :class:`~.lora.LoraManager` checks that first."""
    for name, tensor in parts.norms.items():
        param = model.get_parameter(name)
        parts.saved_norms[name] = param.detach().to("cpu", copy=True)
        with torch.no_grad():
            param.copy_(tensor.to(param.device, param.dtype))
    if parts.width is None:
        return
    base = model.img_in
    wide = nn.Linear(parts.width, base.out_features, bias=base.bias is not None)
    wide = wide.to(device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, : parts.narrow] = base.weight
        if base.bias is not None:
            wide.bias.copy_(base.bias)
    wide.requires_grad_(base.weight.requires_grad)
    parts.saved_img_in = base
    replace_module(model, "img_in", wide)


def restore(parts: ControlParts, model: nn.Module) -> None:
    """Undo :func:`apply`: the original img_in module and norm scales."""
    if parts.saved_img_in is not None:  # where pipe.to() has moved the wide one since (a no-op otherwise)
        wide = model.img_in.weight
        replace_module(model, "img_in", parts.saved_img_in.to(device=wide.device, dtype=wide.dtype))
        parts.saved_img_in = None
    for name, saved in parts.saved_norms.items():
        param = model.get_parameter(name)
        with torch.no_grad():
            param.copy_(saved.to(param.device))
    parts.saved_norms.clear()
