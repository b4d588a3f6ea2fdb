"""Single-file ControlNets: which layout a lone safetensors file has, and the config.json its
diffusers folder would have, read off the tensor shapes and, for what the weights cannot show,
the base model's config (head widths, RoPE axes, time-id width, norm groups) or diffusers' default
for the published nets. :mod:`.controlnet` then loads it like a folder: the inferred config goes
through the same readers and field tables, and the plan validates every key and shape.

Layouts: diffusers names without config.json (what InstantX, Shakker-Labs and xinsir publish as
``diffusion_pytorch_model.safetensors``: ControlNetModel, SD3ControlNetModel, FluxControlNetModel
incl. union nets), and SDXL ControlNets in the original cldm / sgm names (lllyasviel's layout, as
A1111 / ComfyUI load them: ``input_hint_block``, ``input_blocks``, ``zero_convs``,
``middle_block_out``, ``time_embed``, ``label_emb``, with or without ``control_model.``), which
are :class:`~fastflow.models.controlnet_unet.UNetControlNet`'s own names; XLabs FLUX nets in
x-flux's names (``ControlNetFlux``: BFL's transformer names, ``input_hint_block``,
``pos_embed_input``). Anything else (SDXL union nets, SD 1.x nets, SD3.5's single-stream nets) is a
typed refusal.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import CheckpointError, FamilyMismatchError, MissingKeysError, ShapeMismatchError
from .keymaps import Segment
from .layout import Layout
from .quantized import split_quant_keys
from .source import CheckpointSource

ORIGINAL_PREFIX = "control_model."
USE_FOLDER = "pass the ControlNet's diffusers folder (its config.json beside the safetensors file)"


@dataclass(frozen=True)
class SingleFile:
    """What a lone ControlNet file is: its diffusers class, where its tensors sit (``naming``
    "diffusers", or "official": our modules' own cldm names) and its config.json's reader."""

    cls: str
    layout: Layout
    shapes: object  # _Shapes
    reader: Callable  # (shapes, the base model's config) -> the inferred config.json
    key_map: Callable | None = None  # (our key, config) -> its sources, where not the class's map

    @property
    def family(self) -> str:
        return self.layout.family

    def config(self, base) -> dict:
        """The config.json inferred for a base model of config ``base`` (of this family)."""
        return self.reader(self.shapes, base)


class _Shapes:
    """The file's shapes (prefix stripped), read with typed errors for absent or odd tensors."""

    def __init__(self, source: CheckpointSource, prefix: str, keys):
        self.source, self.prefix = source, prefix
        self.shapes = {k: tuple(source.entry(prefix + k).shape) for k in keys}

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def __call__(self, key: str, rank: int = 2) -> tuple[int, ...]:
        if key not in self.shapes:
            raise MissingKeysError(self.source.path, [self.prefix + key], "the ControlNet file is incomplete: "
                                   "re-download it")  # fmt: skip
        shape = self.shapes[key]
        if len(shape) != rank or 0 in shape:
            fix = "the ControlNet file is corrupt or of a layout fastflow does not know"
            raise ShapeMismatchError(self.source.path, {self.prefix + key: (shape, ("...",) * rank)}, fix)
        return shape

    def indices(self, pattern: str) -> list[int]:
        return sorted({int(m[1]) for k in self.shapes if (m := re.match(pattern, k))})


def _heads(source, hidden: int, head_dim: int, what: str) -> int:
    if hidden % head_dim:
        raise CheckpointError(source.path, f"the ControlNet's width {hidden} is not a multiple of the {what} "
                              f"head width {head_dim}, so its head count cannot be read from the file",
                              USE_FOLDER)  # fmt: skip
    return hidden // head_dim


def flux_config(s: _Shapes, base) -> dict:
    """A FluxControlNetModel config.json (InstantX / Shakker-Labs, union nets included)."""
    hidden, in_channels = s("x_embedder.weight")
    norms = ("transformer_blocks.0.attn.norm_q.weight", "single_transformer_blocks.0.attn.norm_q.weight")
    norm = next((k for k in norms if k in s), None)
    head_dim = s(norm, 1)[0] if norm else base.head_dim  # no block: the base's
    modes = s("controlnet_mode_embedder.weight")[0] if "controlnet_mode_embedder.weight" in s else None
    hint = "input_hint_block.conv_out.weight" in s  # XLabs' nets in diffusers names (hint maps packed 2x2)
    return {
        "_class_name": "FluxControlNetModel",
        "patch_size": 2 if hint else 1,
        "in_channels": in_channels,
        "num_layers": len(s.indices(r"transformer_blocks\.(\d+)\.")),
        "num_single_layers": len(s.indices(r"single_transformer_blocks\.(\d+)\.")),
        "attention_head_dim": head_dim,
        "num_attention_heads": _heads(s.source, hidden, head_dim, "base model's"),
        "joint_attention_dim": s("context_embedder.weight")[1],
        "pooled_projection_dim": s("time_text_embed.text_embedder.linear_1.weight")[1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in s,
        "axes_dims_rope": list(base.axes_dim),  # RoPE axes: not in the weights, the base model's
        "num_mode": modes,
        "conditioning_embedding_channels": s("input_hint_block.conv_out.weight", 4)[0] if hint else None,
    }


def sd3_config(s: _Shapes, base) -> dict:
    """An SD3ControlNetModel config.json (InstantX layout: joint blocks with a text stream)."""
    if "context_embedder.weight" not in s:
        raise CheckpointError(s.source.path, "a ControlNet without a text stream (SD3.5's single-stream "
                              "layout) is not supported yet", "use an InstantX-style SD3 ControlNet (joint "
                              "blocks), or diffusers")  # fmt: skip
    hidden, in_channels, patch, _ = s("pos_embed.proj.weight", 4)
    qk_norm = "transformer_blocks.0.attn.norm_q.weight" in s
    head_dim = s("transformer_blocks.0.attn.norm_q.weight", 1)[0] if qk_norm else base.head_dim
    table = s("pos_embed.pos_embed", 3)[1]
    return {
        "_class_name": "SD3ControlNetModel",
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_layers": len(s.indices(r"transformer_blocks\.(\d+)\.")),
        "attention_head_dim": head_dim,
        "num_attention_heads": _heads(s.source, hidden, head_dim, "base model's"),
        "joint_attention_dim": s("context_embedder.weight")[1],
        "caption_projection_dim": hidden,
        "pooled_projection_dim": s("time_text_embed.text_embedder.linear_1.weight")[1],
        "pos_embed_max_size": round(table**0.5),
        "qk_norm": "rms_norm" if qk_norm else None,
        "dual_attention_layers": s.indices(r"transformer_blocks\.(\d+)\.attn2\."),
        "extra_conditioning_channels": s("pos_embed_input.proj.weight", 4)[1] - in_channels,
        # not in the weights: diffusers' default (InstantX's SD3 nets leave it; SD3.5's single-stream
        # nets, which set it false, are refused above)
        "force_zeros_for_pooled_projection": True,
    }


def xlabs_config(s: _Shapes, base) -> dict:
    """A FluxControlNetModel config.json (its XLabs form) for an x-flux ControlNetFlux file: BFL's
    transformer names, ``pos_embed_input``, ``input_hint_block`` (convs at 0, 2, ..., 14)."""
    hidden, in_channels = s("img_in.weight")
    head_dim = s("double_blocks.0.img_attn.norm.query_norm.scale", 1)[0]
    return {
        "_class_name": "FluxControlNetModel",
        "patch_size": 2,  # the hint maps are packed 2x2 (x-flux's rearrange), as diffusers' XLabs configs say
        "in_channels": in_channels,
        "num_layers": len(s.indices(r"double_blocks\.(\d+)\.")),
        "num_single_layers": len(s.indices(r"single_blocks\.(\d+)\.")),
        "attention_head_dim": head_dim,
        "num_attention_heads": _heads(s.source, hidden, head_dim, "file's"),
        "joint_attention_dim": s("txt_in.weight")[1],
        "pooled_projection_dim": s("vector_in.in_layer.weight")[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in s,
        "axes_dims_rope": list(base.axes_dim),  # RoPE axes: not in the weights, the base model's
        "num_mode": None,
        "conditioning_embedding_channels": s("input_hint_block.14.weight", 4)[0],
    }


def xlabs_keys(key: str, config) -> list[Segment]:
    """Sources, in x-flux names, of one of our tensors: ours are BFL's and x-flux's but for the
    control input's linear (x-flux: ``pos_embed_input``)."""
    if key.startswith("controlnet_x_embedder."):
        return [Segment("pos_embed_input." + key.rpartition(".")[2])]
    return [Segment(key)]


def _sdxl_config(s: _Shapes, base, arch: dict) -> dict:
    """A ControlNetModel config.json from the architecture read off either naming; the head width,
    the size conditions' width and the norm groups are not in the weights: the base UNet's."""
    widths, depths, attn = arch["widths"], arch["depths"], arch["attn"]
    heads = [_heads(s.source, w, base.head_dim, "base UNet's") for w in widths]
    per_level = [depths[i] if attn[i] else 1 for i in range(len(widths))]
    if not attn[-1]:
        per_level[-1] = arch["mid_depth"]  # diffusers' mid block takes the last level's count
    return {
        "_class_name": "ControlNetModel",
        "in_channels": arch["in_channels"],
        "conditioning_channels": arch["conditioning_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "block_out_channels": widths,
        "layers_per_block": arch["layers"],
        "transformer_layers_per_block": per_level,
        "attention_head_dim": heads,
        "cross_attention_dim": arch["context"],
        "use_linear_projection": True,  # SDXL's (a conv proj_in is a shape mismatch in the plan)
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": base.time_id_dim,
        "projection_class_embeddings_input_dim": arch["adm"],
        "norm_num_groups": base.norm_groups,
        "conditioning_embedding_out_channels": arch["hint"],
        # not in the weights: diffusers' default, what every published SDXL ControlNet uses
        "controlnet_conditioning_channel_order": "rgb",
    }


def _context(s: _Shapes) -> int:
    key = next((k for k in sorted(s.shapes) if k.endswith("transformer_blocks.0.attn2.to_k.weight")), None)
    if key is None:
        raise MissingKeysError(s.source.path, ["(cross-attention layers)"], "the ControlNet file is incomplete")
    return s(key)[1]


def sdxl_diffusers_config(s: _Shapes, base) -> dict:
    """A ControlNetModel config.json from a diffusers-named file."""
    levels = s.indices(r"down_blocks\.(\d+)\.")
    hint = s.indices(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")
    return _sdxl_config(s, base, {
        "in_channels": s("conv_in.weight", 4)[1],
        "conditioning_channels": s("controlnet_cond_embedding.conv_in.weight", 4)[1],
        "widths": [s(f"down_blocks.{i}.resnets.0.conv1.weight", 4)[0] for i in levels],
        "layers": len(s.indices(r"down_blocks\.0\.resnets\.(\d+)\.")),
        "attn": [f"down_blocks.{i}.attentions.0.proj_in.weight" in s for i in levels],
        "depths": [len(s.indices(rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")) for i in levels],
        "mid_depth": len(s.indices(r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")),
        "context": _context(s),
        "adm": s("add_embedding.linear_1.weight")[1],
        "hint": [s("controlnet_cond_embedding.conv_in.weight", 4)[0]]
        + [s(f"controlnet_cond_embedding.blocks.{i}.weight", 4)[0] for i in hint[1::2]],
    })  # fmt: skip


def sdxl_original_config(s: _Shapes, base) -> dict:
    """A ControlNetModel config.json from a file in the original cldm / sgm names: level l's first
    block is input block 1 + l * (n + 1) (n ResNet blocks, then a downsampler but after the last);
    the hint stack's convs sit at even indices (conv_in, then a 3x3 and a stride-2 conv per width)."""
    levels = len(s.indices(r"input_blocks\.(\d+)\.0\.op\.")) + 1
    per = (max(s.indices(r"input_blocks\.(\d+)\."), default=0) + 1) // levels
    firsts = [1 + level * per for level in range(levels)]
    hint = s.indices(r"input_hint_block\.(\d+)\.weight")
    return _sdxl_config(s, base, {
        "in_channels": s("input_blocks.0.0.weight", 4)[1],
        "conditioning_channels": s("input_hint_block.0.weight", 4)[1],
        "widths": [s(f"input_blocks.{i}.0.in_layers.2.weight", 4)[0] for i in firsts],
        "layers": per - 1,
        "attn": [f"input_blocks.{i}.1.proj_in.weight" in s for i in firsts],
        "depths": [len(s.indices(rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")) for i in firsts],
        "mid_depth": len(s.indices(r"middle_block\.1\.transformer_blocks\.(\d+)\.")),
        "context": _context(s),
        "adm": s("label_emb.0.0.weight")[1],
        "hint": [s("input_hint_block.0.weight", 4)[0]] + [s(f"input_hint_block.{i}.weight", 4)[0] for i in hint[2::2]],
    })  # fmt: skip


# (marker tensors, diffusers class, config reader); the first row whose markers are all present
_DIFFUSERS = (
    (("controlnet_x_embedder.weight", "x_embedder.weight"), "FluxControlNetModel", flux_config),
    (("pos_embed_input.proj.weight", "pos_embed.proj.weight"), "SD3ControlNetModel", sd3_config),
    (("controlnet_cond_embedding.conv_in.weight", "conv_in.weight"), "ControlNetModel", sdxl_diffusers_config),
)
_REFUSED = (  # (marker tensor, what the file is, what to do)
    ("control_add_embedding.linear_1.weight", "an SDXL union ControlNet (ControlNetUnionModel: control modes)",
     "SDXL union ControlNets are not supported yet: use diffusers for this one"),
    ("task_embedding", "an SDXL union ControlNet (ControlNetUnionModel: control modes)",
     "SDXL union ControlNets are not supported yet: use diffusers for this one"),
)  # fmt: skip


def _layout(family: str, naming: str, prefix: str, keys) -> Layout:
    mine, quant = split_quant_keys([k[len(prefix) :] for k in keys])
    return Layout(family, naming, prefix, tuple(mine), (), (), tuple(quant))


def read_single_file(source: CheckpointSource) -> SingleFile:
    """The layout of a lone ControlNet file and its config reader; an unknown or unsupported layout
    is a typed refusal."""
    keys = list(source.key_file)
    prefixed = bool(keys) and all(k.startswith(ORIGINAL_PREFIX) for k in keys)
    prefix = ORIGINAL_PREFIX if prefixed else ""
    layout = _layout("unknown", "diffusers", prefix, keys)
    s = _Shapes(source, prefix, layout.keys + layout.quant_keys)
    for marker, what, fix in _REFUSED:
        if marker in s:
            raise CheckpointError(source.path, f"this file is {what}", fix)
    if prefix == "" and "input_hint_block.0.weight" in s and "pos_embed_input.weight" in s:  # x-flux
        return SingleFile("FluxControlNetModel", _layout("flux", "diffusers", "", keys), s, xlabs_config, xlabs_keys)
    if "input_hint_block.0.weight" in s and "zero_convs.0.0.weight" in s:
        if "label_emb.0.0.weight" not in s:
            raise FamilyMismatchError(source.path, "this is an SD 1.x / 2.x ControlNet (original layout, no "
                                      "label_emb): fastflow's UNet is SDXL's", "load an SDXL ControlNet")  # fmt: skip
        layout = _layout("sdxl", "official", prefix, keys)
        return SingleFile("ControlNetModel", layout, s, sdxl_original_config)
    for markers, cls, reader in _DIFFUSERS:
        if prefix == "" and all(m in s for m in markers):
            family = {"FluxControlNetModel": "flux", "SD3ControlNetModel": "sd3"}.get(cls, "sdxl")
            return SingleFile(cls, _layout(family, "diffusers", "", keys), s, reader)
    raise FamilyMismatchError(source.path, "this safetensors file is not a ControlNet layout fastflow knows "
                              "(diffusers' ControlNetModel / SD3ControlNetModel / FluxControlNetModel names, an "
                              "SDXL ControlNet in the original cldm names, or x-flux's)",
                              "pass a ControlNet's diffusers folder or its safetensors file")  # fmt: skip
