"""The architecture a checkpoint's tensors show, per family: representative tensors (probes) whose
shapes give each size of the config, and block counts from the key names.

Each ``<family>_arch(source, layout)`` returns a tuple in the order of its config's ``arch()``
(``*_FIELDS`` name the entries, for messages); :mod:`.families` ties each reader to its family.
A probe that is missing, of another rank or with a zero size is a typed error, never a guess.
"""

from __future__ import annotations

import re

from ..errors import MissingKeysError, ShapeMismatchError
from .layout import Layout
from .source import CheckpointSource

# Representative tensors that reveal the FLUX architecture, per naming.
_FLUX_PROBES = {
    "official": {
        "img_in": "img_in.weight",
        "txt_in": "txt_in.weight",
        "vec_in": "vector_in.in_layer.weight",
        "q_norm": "double_blocks.0.img_attn.norm.query_norm.scale",
        "mlp": "double_blocks.0.img_mlp.0.weight",
        "out": "final_layer.linear.weight",
        "guidance": "guidance_in.in_layer.weight",
        "double": r"double_blocks\.(\d+)\.",
        "single": r"single_blocks\.(\d+)\.",
    },
    "diffusers": {
        "img_in": "x_embedder.weight",
        "txt_in": "context_embedder.weight",
        "vec_in": "time_text_embed.text_embedder.linear_1.weight",
        "q_norm": "transformer_blocks.0.attn.norm_q.weight",
        "mlp": "transformer_blocks.0.ff.net.0.proj.weight",
        "out": "proj_out.weight",
        "guidance": "time_text_embed.guidance_embedder.linear_1.weight",
        "double": r"transformer_blocks\.(\d+)\.",
        "single": r"single_transformer_blocks\.(\d+)\.",
    },
}

FLUX_FIELDS = (
    "in_channels",
    "out_channels",
    "vec_in_dim",
    "context_in_dim",
    "hidden_size",
    "mlp_hidden",
    "num_heads",
    "depth",
    "depth_single_blocks",
    "guidance_embed",
)


def flux_arch(source: CheckpointSource, layout: Layout) -> tuple:
    """The FLUX architecture tuple (FluxConfig.arch() order) read off the tensor shapes."""
    probes = _FLUX_PROBES[layout.naming]
    shapes = _shapes_with(source, layout, probes, ("img_in", "txt_in", "vec_in", "q_norm", "mlp", "out"))

    def count(pattern):
        return len(_indices(layout, pattern))

    hidden, in_ch = shapes[probes["img_in"]]
    return (
        in_ch,
        shapes[probes["out"]][0],
        shapes[probes["vec_in"]][1],
        shapes[probes["txt_in"]][1],
        hidden,
        shapes[probes["mlp"]][0],
        hidden // shapes[probes["q_norm"]][0],
        count(probes["double"]),
        count(probes["single"]),
        probes["guidance"] in shapes,
    )


_SD3_PROBES = {
    "official": {
        "patch": "x_embedder.proj.weight",
        "pos": "pos_embed",
        "adm": "y_embedder.mlp.0.weight",
        "ctx": "context_embedder.weight",
        "out": "final_layer.linear.weight",
        "mlp": "joint_blocks.0.x_block.mlp.fc1.weight",
        "q_norm": "joint_blocks.0.x_block.attn.ln_q.weight",
        "block": r"joint_blocks\.(\d+)\.",
        "dual": r"joint_blocks\.(\d+)\.x_block\.attn2\.",
    },
    "diffusers": {
        "patch": "pos_embed.proj.weight",
        "pos": "pos_embed.pos_embed",
        "adm": "time_text_embed.text_embedder.linear_1.weight",
        "ctx": "context_embedder.weight",
        "out": "proj_out.weight",
        "mlp": "transformer_blocks.0.ff.net.0.proj.weight",
        "q_norm": "transformer_blocks.0.attn.norm_q.weight",
        "block": r"transformer_blocks\.(\d+)\.",
        "dual": r"transformer_blocks\.(\d+)\.attn2\.",
    },
}
SD3_FIELDS = (
    "depth",
    "hidden_size",
    "num_heads",
    "mlp_hidden",
    "patch_size",
    "in_channels",
    "out_channels",
    "context_in_dim",
    "adm_in_dim",
    "pos_embed_max_size",
    "qk_norm",
    "dual_attention_layers",
)


# The rank of every tensor detection reads a size from (probes not listed: rank 2).
_PROBE_RANKS = {"q_norm": 1, "patch": 4, "pos": 3, "conv_in": 4, "z": 4, "first": 4, "out_conv": 4}


def _shapes_with(source: CheckpointSource, layout: Layout, probes: dict, needed) -> dict:
    """All shapes of the component, after checking that the probed tensors exist and have the
    rank and non-zero sizes detection reads from them."""
    shapes = {k: source.entry(layout.prefix + k).shape for k in layout.keys}
    missing = [probes[n] for n in needed if probes[n] not in shapes]
    if missing:
        raise MissingKeysError(
            source.path, [layout.prefix + k for k in missing], "the checkpoint is incomplete: re-download it"
        )
    for name in (n for n in probes if isinstance(probes[n], str) and probes[n] in shapes):
        _check_probe(source, layout, probes[name], shapes[probes[name]], _PROBE_RANKS.get(name, 2))
    return shapes


def _check_probe(source: CheckpointSource, layout: Layout, key: str, shape: tuple, rank: int) -> None:
    if len(shape) != rank or 0 in shape:
        raise ShapeMismatchError(
            source.file_of(layout.prefix + key),
            {layout.prefix + key: (shape, ("...",) * rank)},
            f"this tensor must have {rank} non-zero dimension(s): the checkpoint is corrupt or not a model "
            "fastflow knows",
        )


def _indices(layout: Layout, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in layout.keys if (m := re.match(pattern, k))})


def sd3_arch(source: CheckpointSource, layout: Layout) -> tuple:
    """The MMDiT architecture tuple (MMDiTConfig.arch() order) read off the tensor shapes."""
    probes = _SD3_PROBES[layout.naming]
    shapes = _shapes_with(source, layout, probes, ("patch", "pos", "adm", "ctx", "out", "mlp"))
    hidden, in_ch, patch, _ = shapes[probes["patch"]]
    qk_norm = probes["q_norm"] in shapes
    # head_dim is 64 in every SD3 model (SAI: hidden = 64 * depth); ln_q shows it where present
    head_dim = shapes[probes["q_norm"]][0] if qk_norm else 64
    return (
        len(_indices(layout, probes["block"])),
        hidden,
        hidden // head_dim,
        shapes[probes["mlp"]][0],
        patch,
        in_ch,
        shapes[probes["out"]][0] // (patch * patch),
        shapes[probes["ctx"]][1],
        shapes[probes["adm"]][1],
        round(shapes[probes["pos"]][1] ** 0.5),
        qk_norm,
        tuple(_indices(layout, probes["dual"])),
    )


_VAE_PROBES = {
    "official": {"level": r"encoder\.down\.(\d+)\.", "block": "encoder.down.{i}.block.{j}.conv1.weight"},
    "diffusers": {
        "level": r"encoder\.down_blocks\.(\d+)\.",
        "block": "encoder.down_blocks.{i}.resnets.{j}.conv1.weight",
    },
}
VAE_FIELDS = ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_channels", "quant_conv")


def vae_arch(source: CheckpointSource, layout: Layout) -> tuple:
    """The VAE architecture tuple (VAEConfig.arch() order) read off the tensor shapes."""
    probes = {
        "conv_in": "encoder.conv_in.weight",
        "z": "decoder.conv_in.weight",
        "out_conv": "decoder.conv_out.weight",
        "first": _VAE_PROBES[layout.naming]["block"].format(i=0, j=0),
    }
    shapes = _shapes_with(source, layout, probes, tuple(probes))
    ch, in_ch = shapes[probes["conv_in"]][:2]
    levels = _indices(layout, _VAE_PROBES[layout.naming]["level"])
    block = _VAE_PROBES[layout.naming]["block"]
    level_keys = [block.format(i=i, j=0) for i in levels if block.format(i=i, j=0) in shapes]
    for key in level_keys:
        _check_probe(source, layout, key, shapes[key], 4)
    ch_mult = tuple(shapes[key][0] // ch for key in level_keys)
    n_blocks = sum(1 for j in range(64) if block.format(i=0, j=j) in shapes)
    quant = "quant_conv.weight" in shapes
    return (ch, ch_mult, n_blocks, shapes[probes["z"]][1], in_ch, shapes[probes["out_conv"]][0], quant)


_UNET_PROBES = {
    "official": {
        "conv_in": "input_blocks.0.0.weight",
        "out_conv": "out.2.weight",
        "adm": "label_emb.0.0.weight",
        "down": r"input_blocks\.(\d+)\.0\.op\.",
        "input": r"input_blocks\.(\d+)\.",
        "res": "input_blocks.{i}.0.in_layers.2.weight",  # i: level l's first block, 1 + l * (n + 1)
        "depth": r"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.",
        "mid": r"middle_block\.1\.transformer_blocks\.(\d+)\.",
        "context": r"(input|middle|output)_blocks?\.[\d.]*transformer_blocks\.0\.attn2\.to_k\.weight",
    },
    "diffusers": {
        "conv_in": "conv_in.weight",
        "out_conv": "conv_out.weight",
        "adm": "add_embedding.linear_1.weight",
        "level": r"down_blocks\.(\d+)\.",
        "n_res": r"down_blocks\.0\.resnets\.(\d+)\.",
        "res": "down_blocks.{l}.resnets.0.conv1.weight",
        "depth": r"down_blocks\.{l}\.attentions\.0\.transformer_blocks\.(\d+)\.",
        "mid": r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.",
        "context": r"(down|mid|up)_blocks?\.[\w.]*transformer_blocks\.0\.attn2\.to_k\.weight",
    },
}
UNET_FIELDS = (
    "in_channels",
    "out_channels",
    "model_channels",
    "channel_mult",
    "num_res_blocks",
    "transformer_depth",
    "transformer_depth_middle",
    "context_dim",
    "adm_in_channels",
)


def unet_arch(source: CheckpointSource, layout: Layout) -> tuple:
    """The SDXL UNet architecture tuple (UNetConfig.arch() order) read off the tensor shapes."""
    probes = _UNET_PROBES[layout.naming]
    shapes = _shapes_with(source, layout, probes, ("conv_in", "out_conv", "adm"))
    mc, in_ch = shapes[probes["conv_in"]][:2]
    if layout.naming == "official":
        levels = len(_indices(layout, probes["down"])) + 1
        per = (max(_indices(layout, probes["input"]), default=0) + 1) // levels  # n + 1 blocks a level
        firsts = [1 + level * per for level in range(levels)]
        res = [probes["res"].format(i=i) for i in firsts]
        depths = [len(_indices(layout, probes["depth"].format(i=i))) for i in firsts]
        n_res = per - 1
    else:
        levels = len(_indices(layout, probes["level"]))
        res = [probes["res"].format(l=level) for level in range(levels)]
        depths = [len(_indices(layout, probes["depth"].format(l=level))) for level in range(levels)]
        n_res = len(_indices(layout, probes["n_res"]))
    missing = [k for k in res if k not in shapes]
    if missing or n_res < 1:
        raise MissingKeysError(
            source.path, [layout.prefix + k for k in missing] or ["(ResNet blocks)"], "the UNet is incomplete"
        )
    for key in res:
        _check_probe(source, layout, key, shapes[key], 4)
    context = next((shapes[k] for k in layout.keys if re.fullmatch(probes["context"], k)), (0, 0))
    return (
        in_ch,
        shapes[probes["out_conv"]][0],
        mc,
        tuple(shapes[k][0] // mc for k in res),
        n_res,
        tuple(depths),
        len(_indices(layout, probes["mid"])),
        context[1] if len(context) == 2 else 0,
        shapes[probes["adm"]][1],
    )
