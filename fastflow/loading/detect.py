"""What a checkpoint is: family and layout from tensor names, the architecture from shapes, and
the variant from the registry, ``variant=``, or metadata.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import (
    AmbiguousVariantError,
    CheckpointError,
    MissingKeysError,
    ShapeMismatchError,
    UnknownConfigError,
    VariantMismatchError,
)
from ..models import configs as registry
from . import described
from .keymaps import COMPONENT_PREFIXES, OTHER_COMPONENT_PREFIXES
from .quantized import split_quant_keys
from .sources import CheckpointSource

FAMILY_NAMES = {
    "flux": "a FLUX.1 transformer",
    "sd3": "an SD3/SD3.5 MMDiT transformer",
    "sdxl": "an SDXL UNet",
    "vae": "a VAE (autoencoder)",
    "text_encoder": "a text encoder (CLIP or T5)",
    "unknown": "no model fastflow knows",
}


@dataclass(frozen=True)
class Layout:
    family: str  # flux | sd3 | vae | text_encoder | unknown
    naming: str | None  # "official" (BFL/SAI names) or "diffusers"
    prefix: str  # stripped from the component's keys ("", "model.diffusion_model.", "first_stage_model.")
    keys: tuple[str, ...]  # the component's keys with the prefix stripped
    other_keys: tuple[str, ...]  # keys of other components (left for their loaders)
    foreign_keys: tuple[str, ...]  # keys that belong to nothing known
    quant_keys: tuple[str, ...] = ()  # FP8 scales and format markers, prefix stripped (loading/quantized.py)


def _is_other_component(key: str) -> bool:
    return key.startswith(OTHER_COMPONENT_PREFIXES)


def detect_layout(keys, component: str = "transformer") -> Layout:
    """Split a checkpoint's keys into the component's own (prefix stripped), other known
    components' (all-in-one files) and foreign ones; name the family and naming of the rest."""
    keys = list(keys)
    own = COMPONENT_PREFIXES[component]
    prefix = next((p for p in own if any(k.startswith(p) for k in keys)), "")
    mine, other, foreign = [], [], []
    for k in keys:
        if prefix and k.startswith(prefix):
            mine.append(k[len(prefix) :])
        elif _is_other_component(k):
            other.append(k)
        elif prefix:
            foreign.append(k)
        else:
            mine.append(k)
    mine, quant = split_quant_keys(mine)
    family, naming = _family(mine) if mine else _family(other)
    return Layout(family, naming, prefix, tuple(mine), tuple(other), tuple(foreign), tuple(quant))


def _family(keys: list[str]) -> tuple[str, str | None]:
    def has(pattern: str) -> bool:
        return any(re.match(pattern, k) for k in keys)

    if has(r"(double|single)_blocks\.\d+\."):
        return "flux", "official"
    if has(r"single_transformer_blocks\.\d+\."):
        return "flux", "diffusers"
    if has(r"joint_blocks\.\d+\."):
        return "sd3", "official"
    if has(r"transformer_blocks\.\d+\.") and has(r"pos_embed\.proj\."):
        return "sd3", "diffusers"
    if has(r"input_blocks\.\d+\.") and has(r"label_emb\.0\."):
        return "sdxl", "official"
    if has(r"down_blocks\.\d+\.") and has(r"add_embedding\."):
        return "sdxl", "diffusers"
    if has(r"(first_stage_model\.|vae\.)?(decoder|encoder)\.conv_in\."):
        return "vae", "diffusers" if has(
            r"(first_stage_model\.|vae\.)?(de|en)coder\.(up|down)_blocks\."
        ) else "official"
    if has(r"(text_encoders?\.\w*\.?)?(transformer\.)?(text_model\.|encoder\.block\.|shared\.weight)"):
        return "text_encoder", None
    return "unknown", None


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

_ARCH_FIELDS = (
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
_SD3_FIELDS = (
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
_VAE_FIELDS = ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_channels", "quant_conv")


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
_UNET_FIELDS = (
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


def describe_arch(arch: tuple, family: str) -> str:
    fields = {"flux": _ARCH_FIELDS, "sd3": _SD3_FIELDS, "vae": _VAE_FIELDS, "sdxl": _UNET_FIELDS}[family]
    return ", ".join(f"{f}={v}" for f, v in zip(fields, arch, strict=True))


_VAE_SCALES = {"flux": 0.3611, "sd3": 1.5305, "sdxl": 0.13025}


def vae_latent_factors(source: CheckpointSource) -> tuple[float, float] | None:
    """(scale, shift) from a diffusers VAE folder's config.json, checked; None when it has none."""
    cfg = source.folder_config
    if "scaling_factor" not in cfg:
        return None
    scale, shift = cfg["scaling_factor"], cfg.get("shift_factor")
    shift = 0.0 if shift is None else shift
    for name, value, nonzero in (("scaling_factor", scale, True), ("shift_factor", shift, False)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (nonzero and value == 0):
            raise CheckpointError(
                source.path,
                f"config.json {name} is {value!r}; it must be a finite{' non-zero' if nonzero else ''} number",
                "fix config.json (the latent scale/shift the VAE was trained with) or re-download it",
            )
    return float(scale), float(shift)


def _vae_hint(source: CheckpointSource, layout: Layout | None, candidates: list, prefer: str | None) -> list:
    """FLUX and SD3 VAEs share tensors: a diffusers config.json gives the latent scale and shift;
    an SAI single file (``first_stage_model.``) holds the SD3 VAE."""
    factors = vae_latent_factors(source)
    if factors is not None:
        same = [
            c for c in candidates if abs(c.scale_factor - factors[0]) < 1e-6 and abs(c.shift_factor - factors[1]) < 1e-6
        ]
        return same or candidates[:1]  # the file's own factors are applied by resolve_config
    if layout is not None and layout.prefix == "first_stage_model.":
        prefer = "sd3"
    if prefer in _VAE_SCALES:
        return [c for c in candidates if abs(c.scale_factor - _VAE_SCALES[prefer]) < 1e-6]
    return []


def _metadata_hint(source: CheckpointSource, candidates: list, layout: Layout | None = None, prefer=None) -> list:
    named = source.metadata.get("fastflow.variant")
    if named:
        return [c for c in candidates if c.name == named]
    if candidates[0].family == "vae":
        return _vae_hint(source, layout, candidates, prefer)
    text = " ".join(
        str(v) for k, v in source.metadata.items() if k.startswith("modelspec.") or k in ("name", "model")
    ).lower()
    if source.pipeline_class:
        text += " " + source.pipeline_class.lower()
    if candidates[0].family == "sdxl" and Path(source.path).is_file():  # sd_xl_turbo_1.0_fp16.safetensors
        text += " " + Path(source.path).stem.lower()
    text += " " + str(source.folder_config.get("_name_or_path", "")).lower()
    named = bool(text.strip())  # something names the model...
    if any(hasattr(c, "kontext") for c in candidates):
        if "kontext" in text:
            return [c for c in candidates if c.kontext]
        if named:  # ...and not as Kontext (FluxPipeline, "FLUX.1-dev")
            return [c for c in candidates if not c.kontext]
    if any(hasattr(c, "turbo") for c in candidates):
        spacing = source.scheduler_config.get("timestep_spacing")
        if candidates[0].family == "sdxl" and spacing in ("trailing", "leading"):  # Turbo's scheduler: trailing
            return [c for c in candidates if c.turbo == (spacing == "trailing")]
        if "turbo" in text:
            return [c for c in candidates if c.turbo]
        if any(k.startswith("modelspec.") for k in source.metadata):  # the file names itself, not as turbo
            return [c for c in candidates if not c.turbo]
    return []


def resolve_config(
    family: str,
    arch: tuple,
    source: CheckpointSource,
    variant: str | None,
    config=None,
    layout: Layout | None = None,
    prefer: str | None = None,
):
    """Pick the config: ``config=`` or ``variant=`` if given (checked against the weights), else the
    only registered config with this architecture, else the one the metadata names. A VAE
    folder's config.json scale/shift always apply (registered values are defaults), except over
    an explicit ``config=``."""
    cfg = _resolve(family, arch, source, variant, config, layout, prefer)
    if family == "sdxl" and config is None:  # head and time-id widths: config.json's, where it has them
        told = described.from_folder_config(family, source.folder_config, cfg.name)
        if told is not None and (told.head_dim, told.time_id_dim) != (cfg.head_dim, cfg.time_id_dim):
            cfg = cfg.replace(head_dim=told.head_dim, time_id_dim=told.time_id_dim)
    factors = vae_latent_factors(source) if family == "vae" and config is None else None
    if factors is not None and factors != (cfg.scale_factor, cfg.shift_factor):
        cfg = cfg.replace(scale_factor=factors[0], shift_factor=factors[1])
    upcast = source.folder_config.get("force_upcast") if family == "vae" and config is None else None
    if isinstance(upcast, bool) and upcast != cfg.force_upcast:  # the fp16-fix SDXL VAE says False
        cfg = cfg.replace(force_upcast=upcast)
    return cfg


def _described_name(source: CheckpointSource) -> str:
    path = Path(source.path)
    label = path.parent.name if path.is_dir() and path.name == "transformer" else path.stem
    return f"custom:{label}"


def _resolve(family, arch, source, variant, config, layout, prefer):
    if isinstance(config, dict):  # fields of the family's config class (the rest: full-size values)
        config = described.from_fields(family, config, _described_name(source))
    if config is not None or variant is not None:
        cfg = config if config is not None else registry.from_name(variant)
        if cfg.family != family or cfg.arch() != arch:
            raise VariantMismatchError(
                source.path,
                f"{cfg.name} does not fit this checkpoint's tensors ({FAMILY_NAMES[family]} with "
                f"{describe_arch(arch, family)})",
                "pass the variant that matches the file, or leave variant= unset to detect it",
            )
        return cfg
    candidates = [c for c in registry.configs_of(family) if c.arch() == arch]
    if not candidates:
        naming = f"{source.pipeline_class or ''} {source.folder_config.get('_name_or_path', '')}".lower()
        cfg = described.from_folder_config(
            family, source.folder_config, _described_name(source), kontext="kontext" in naming
        )
        if cfg is not None:  # a diffusers folder's config.json describes it
            if cfg.arch() != arch:
                raise VariantMismatchError(
                    source.path,
                    f"its config.json describes {describe_arch(cfg.arch(), family)} but the tensors are "
                    f"{describe_arch(arch, family)}",
                    "fix config.json, or pass config={...} with the fields that describe the tensors",
                )
            return cfg
        cls = type(registry.configs_of(family)[0]).__name__
        raise UnknownConfigError(
            source.path,
            f"{FAMILY_NAMES[family]} with {describe_arch(arch, family)} fits no registered config "
            f"(known: {', '.join(registry.list_models(family, include_tiny=True))}) and no diffusers "
            "config.json describes it",
            f"describe it: fastflow.load(..., config={{'depth': ..., ...}}) (fields of {cls}; the rest "
            "default to the full-size model) or fastflow generate --config '{\"depth\": ...}' (or a .json file)",
        )
    if len(candidates) == 1:
        return candidates[0]
    hinted = _metadata_hint(source, candidates, layout, prefer)
    if len(hinted) == 1:
        return hinted[0]
    names = " or ".join(repr(c.name) for c in candidates)
    raise AmbiguousVariantError(
        source.path,
        f"its tensors fit {names} equally (these variants have identical keys and shapes) and the "
        "file's metadata does not say which",
        f"pass variant= explicitly, e.g. variant={candidates[0].name!r}",
    )
