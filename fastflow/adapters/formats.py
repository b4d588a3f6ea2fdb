"""LoRA files onto fastflow's layers: the formats users hold, mapped onto our (official BFL / SAI)
layer names and fused layouts.

Formats read:

* diffusers / PEFT: ``[transformer.]<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` (also
  the older ``.lora.down.weight`` / ``.lora.up.weight``), optional ``.alpha`` and
  ``.lora_B.bias`` (PEFT's lora_bias, in BFL's control LoRAs: scaled like the product);
* the same on official names (BFL's own LoRAs, ComfyUI's ``diffusion_model.`` prefix);
* kohya / sd-scripts: ``lora_unet_<official module, dots as underscores>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` (and ``lora_transformer_<diffusers module>``);
* XLabs (FLUX): ``double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`` (1: image
  stream, 2: text stream) and ``single_blocks.N.processor.{qkv,proj}_lora.*``.

Every LoRA becomes, per target layer of ours, a list of :class:`Piece` (down A [r, in], up B
[rows, r], scale alpha / r, the row range of the target it writes). diffusers' separate q / k / v
(and FLUX's single-block MLP) land in their rows of our fused ``qkv`` / ``linear1``, and the final
layer's modulation halves are swapped, through the same key maps the checkpoint loader uses.

Refused with :class:`~fastflow.errors.LoraError` naming the key (never cast or applied silently):
integer / bool weights (an integer alpha is read as its number); NaN or inf in any weight or
alpha; an alpha that is not one number; any
|down| or |up| element above ``MAX_LORA_VALUE`` (1e4) or |alpha / rank| above
``MAX_ALPHA_OVER_RANK`` (1e4): trained LoRAs stay orders of magnitude below both, and such values
overflow fp16 products; rank 0; and two keys writing the same rows of one layer (the same module
under two prefixes, or diffusers and official names for the same rows), naming both keys.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import FamilyMismatchError, LoraError
from ..loading.keymaps import flux_from_diffusers, sd3_from_diffusers, unet_from_diffusers
from .formats_sdxl import SDXL_HINTS, TEXT_ENCODER_PREFIXES, legacy_module, refuse_unsupported_kinds
from .layers import LoraLinear, Piece

DOWN, UP, ALPHA, BIAS = "down", "up", "alpha", "bias"
# suffix -> role, longest first (".lora_A.weight" before ".weight" alone)
_SUFFIXES = (
    (".lora_B.bias", BIAS),  # BFL's control LoRAs (PEFT's lora_bias): added with the product's scale
    (".lora_A.weight", DOWN),
    (".lora_B.weight", UP),
    (".lora.down.weight", DOWN),
    (".lora.up.weight", UP),
    (".lora_down.weight", DOWN),
    (".lora_up.weight", UP),
    (".down.weight", DOWN),
    (".up.weight", UP),
    (".alpha", ALPHA),
)
# Bounds (refused, not warned: past them the image is garbage or the product overflows fp16):
# |value| of any down / up element, and |alpha / rank|. Trained LoRAs stay below ~10 and ~16.
MAX_LORA_VALUE = 1e4
MAX_ALPHA_OVER_RANK = 1e4
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.", "unet.")
_XLABS = re.compile(r"(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora(\d?)")
# keys that name another component (text encoders): reported as not applied
_OTHER_COMPONENTS = TEXT_ENCODER_PREFIXES
_FAMILY_HINTS = {
    "flux": ("double_blocks", "single_blocks", "single_transformer_blocks"),
    "sd3": ("joint_blocks", "context_block", "x_block"),
    "sdxl": SDXL_HINTS,
}
# kohya's prefix for diffusers module names: FLUX's trainers write lora_transformer_, SDXL's lora_unet_
_KOHYA_DIFFUSERS = {"sdxl": "lora_unet_"}


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Our layers a LoRA can target: every module with a 2-D ``weight`` ([out, in]) that runs as a
    linear layer (nn.Linear, FP8 linears, LoRA-wrapped layers)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            out[name] = module
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2:
            if not isinstance(module, nn.Embedding) and not any(name.startswith(n + ".") for n in out):
                out[name] = module
    return out


def _out_in(layer: nn.Module) -> tuple[int, int]:
    base = getattr(layer, "base", layer)
    return base.weight.shape[0], base.weight.shape[1]


def _diffusers_map(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, list[tuple[str, int, int, int, bool]]]:
    """diffusers module -> [(our layer, our first row, source first row, rows, half)] for every
    layer; ``half``: the source feeds half of its rows there (the swapped final modulation)."""
    family = model.config.family
    keymap = {"flux": flux_from_diffusers, "sd3": sd3_from_diffusers, "sdxl": unet_from_diffusers}[family]
    width = getattr(model.config, "hidden_size", 0)  # FLUX's fused linear1 only
    out: dict[str, list[tuple[str, int, int, int, bool]]] = {}
    for name in layers:
        try:
            segments = keymap(f"{name}.weight", model.config)
        except KeyError:
            continue
        rows_out, _ = _out_in(layers[name])
        if len(segments) == 4:  # FLUX single block linear1: q, k, v (hidden each) then the MLP
            sizes = [width] * 3 + [rows_out - 3 * width]
        else:
            sizes = [rows_out // len(segments)] * len(segments)
        offset = 0
        for seg, rows in zip(segments, sizes, strict=True):
            module = seg.key.rsplit(".", 1)[0]
            start = 0 if seg.half is None else seg.half * rows
            out.setdefault(module, []).append((name, offset, start, rows, seg.half is not None))
            offset += rows
    return out


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _strip(module: str) -> str:
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix) :]
    return module


def _family_of(keys) -> str | None:
    text = " ".join(keys)
    found = [f for f, hints in _FAMILY_HINTS.items() if any(h in text for h in hints)]
    return found[0] if len(found) == 1 else None


def _xlabs_target(module: str) -> tuple[str, int, bool] | None:
    """(our layer, first row, whether it covers only the q, k, v rows) of an XLabs processor LoRA."""
    m = _XLABS.fullmatch(module)
    if not m:
        return None
    kind, block, what, stream = m[1], m[2], m[3], m[4]
    if kind == "double":
        side = "img" if stream in ("", "1") else "txt"
        return f"double_blocks.{block}.{side}_attn.{what}", 0, False
    if what == "proj":
        return f"single_blocks.{block}.linear2", 0, False
    return f"single_blocks.{block}.linear1", 0, True  # the q, k, v rows (the first 3 x hidden)


def _check_tensor(path, key: str, role: str, tensor: torch.Tensor) -> None:
    """Refuse what would be cast silently into garbage: integer / bool tensors, NaN / inf, an alpha
    that is not one number, and values beyond :data:`MAX_LORA_VALUE`."""
    integer_alpha = role == ALPHA and tensor.dtype not in (torch.bool, torch.uint8)  # kohya alphas may be ints
    if not tensor.is_floating_point() and not integer_alpha:
        raise LoraError(path, f"tensor {key!r} is {str(tensor.dtype).removeprefix('torch.')}, not a float type",
                        "LoRA weights are fp32 / bf16 / fp16: the file is corrupt or not a LoRA")  # fmt: skip
    if role == BIAS and tensor.dim() != 1:
        raise LoraError(path, f"bias {key!r} has shape {list(tensor.shape)}, not a vector", "the file is corrupt")
    if role not in (ALPHA, BIAS) and tensor.dim() != 2:
        raise LoraError(path, f"tensor {key!r} has shape {list(tensor.shape)}, not a [rank, features] matrix",
                        "the file is corrupt or not a LoRA of linear layers")  # fmt: skip
    if role == ALPHA and tensor.numel() != 1:
        raise LoraError(path, f"alpha {key!r} has shape {list(tensor.shape)}, not one number", "the file is corrupt")
    values = tensor.float()
    if not torch.isfinite(values).all():
        raise LoraError(path, f"tensor {key!r} holds NaN or inf values", "the file is corrupt: re-download it")
    if role != ALPHA and values.numel() and values.abs().max() > MAX_LORA_VALUE:
        raise LoraError(path, f"tensor {key!r} holds |values| up to {values.abs().max().item():.3g}, beyond "
                        f"{MAX_LORA_VALUE:g}", "no trained LoRA has such values: the file is corrupt")  # fmt: skip


def parse(
    state: dict[str, torch.Tensor], model: nn.Module, path, widths: dict[str, tuple[int, int]] | None = None
) -> tuple[dict[str, list[Piece]], list[str]]:
    """(target layer -> pieces, keys that match no layer of ``model``). Raises :class:`LoraError`
    for a file with no LoRA key, a missing half, a rank or shape mismatch (naming the first bad
    key), or no key that targets this model; :class:`FamilyMismatchError` for another family's.
    ``widths``: layer -> (inputs it will have, inputs it had) for a layer a control LoRA widens
    (adapters/control.py): downs of either width fit, the narrower zero-padded (as diffusers'
    ``_maybe_expand_lora_state_dict``)."""
    widths = widths or {}
    layers = linear_layers(model)
    kohya = {"lora_unet_" + n.replace(".", "_"): n for n in layers}
    dmap = _diffusers_map(model, layers)
    prefix = _KOHYA_DIFFUSERS.get(model.config.family, "lora_transformer_")
    kohya_diffusers = {prefix + d.replace(".", "_"): d for d in dmap}
    refuse_unsupported_kinds(state, path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, tensor in state.items():
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        module, role = split
        _check_tensor(path, key, role, tensor)
        groups.setdefault(module, {})[role] = tensor
    if not groups:
        raise LoraError(path, "no LoRA tensors in this file (no lora_A / lora_B / lora_down / lora_up keys)",
                        "pass a LoRA file")  # fmt: skip
    family = _family_of(groups)
    if family is not None and family != model.config.family:
        raise FamilyMismatchError(
            path, f"this LoRA is for {family.upper()} but the model is {model.config.family.upper()}",
            "load it on a pipeline of its own family",
        )  # fmt: skip
    targets: dict[str, list[Piece]] = {}
    for module, parts in groups.items():
        if DOWN not in parts or UP not in parts:
            missing = "up" if DOWN in parts else "down"
            raise LoraError(path, f"{module}: the {missing} half of this LoRA pair is missing", "re-download the file")
        down, up = parts[DOWN], parts[UP]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(
                path, f"{module}: down {list(down.shape)} and up {list(up.shape)} are not a LoRA pair "
                "(down [rank, in], up [out, rank])", "re-download the file or check its format",
            )  # fmt: skip
        rank = down.shape[0]
        alpha = parts.get(ALPHA)
        if rank == 0:
            raise LoraError(path, f"{module}: rank 0 (down {list(down.shape)})", "re-download the file")
        scale = 1.0 if alpha is None else float(alpha.reshape(())) / rank
        if not abs(scale) <= MAX_ALPHA_OVER_RANK:
            raise LoraError(path, f"{module}.alpha: alpha / rank = {scale:g} is beyond +-{MAX_ALPHA_OVER_RANK:g}",
                            "the file is corrupt: re-download it")  # fmt: skip
        name = legacy_module(_strip(module))
        # (our layer, our first row, source first row, source rows expected or None: the layer's)
        if name in layers or module in kohya:
            places = [(name if name in layers else kohya[module], 0, 0, None)]
        elif name in dmap or module in kohya_diffusers:
            places = [
                (t, row, src, 2 * rows if half else rows, rows)
                for t, row, src, rows, half in dmap[kohya_diffusers.get(module, name)]
            ]
        elif _xlabs_target(name):
            target, row, qkv_only = _xlabs_target(name)
            places = [(target, row, 0, 3 * model.config.hidden_size if qkv_only else None)]
        else:
            unmatched.extend(f"{module}{s}" for s, r in _SUFFIXES if r in parts and f"{module}{s}" in state)
            continue
        bias = parts.get(BIAS)
        if bias is not None and bias.shape[0] != up.shape[0]:
            raise LoraError(path, f"{module}: lora_B bias {list(bias.shape)} does not match up {list(up.shape)}",
                            "re-download the file")  # fmt: skip
        for target, row, src, expected, *take in places:
            out_features, in_features = _out_in(layers[target])
            if bias is not None and getattr(getattr(layers[target], "base", layers[target]), "bias", None) is None:
                raise LoraError(path, f"{module}: a lora_B bias for {target}, a layer without a bias",
                                "LoRA biases are supported on layers that have one (FLUX's all do)")  # fmt: skip
            piece_down = down
            if target in widths:
                in_features, narrow = widths[target]
                if down.shape[1] == narrow < in_features:  # a LoRA of the narrow layer: zeros for the new inputs
                    piece_down = torch.cat((down, down.new_zeros(down.shape[0], in_features - narrow)), dim=1)
            rows = take[0] if take else (expected or out_features)
            if (
                up.shape[0] != (expected or out_features)
                or piece_down.shape[1] != in_features
                or row + rows > out_features
            ):
                raise LoraError(
                    path,
                    f"{module}: a LoRA of up {list(up.shape)} x down {list(down.shape)} does not fit the layer it "
                    f"names ({target}, [{out_features}, {in_features}])",
                    "this LoRA was made for another model size or variant",
                )
            for other in targets.get(target, []):
                if other.row < row + rows and row < other.row + other.up.shape[0]:
                    raise LoraError(
                        path, f"{other.key} and {module} both target rows of {target}",
                        "the file holds the same layer twice (two prefixes or two formats): keep one",
                    )  # fmt: skip
            piece_bias = None if bias is None else bias[src : src + rows]
            targets.setdefault(target, []).append(
                Piece(piece_down, up[src : src + rows], scale, row, module, piece_bias)
            )
    if not targets:
        if unmatched and all(is_other_component(k) for k in unmatched):
            raise LoraError(path, f"this LoRA holds text-encoder keys only (first: {sorted(unmatched)[0]}); fastflow "
                            f"applies LoRA to {model.config.name}'s transformer / UNet",
                            "use a LoRA with keys for the transformer / UNet")  # fmt: skip
        raise LoraError(path, f"no key of this LoRA names a layer of {model.config.name} "
                        f"(first: {next(iter(state))})", "check that the LoRA is for this model")  # fmt: skip
    return targets, sorted(unmatched)


def is_other_component(key: str) -> bool:
    return key.startswith(_OTHER_COMPONENTS)
