"""ControlNets from diffusers folders (``config.json`` + safetensors), through the same stages as every
component: the source (files and headers validated), a description (the family from config.json's
class and the key names, the config from config.json, every field honoured or refused), the plan
(the module on meta, FP8 swaps, the key map from our names to diffusers', every name / shape /
dtype validated) and materialize.

A ControlNet must fit the base model it drives: its family and the widths its residuals and inputs
have (:func:`check_fits`); a mismatch is a :class:`~fastflow.errors.FamilyMismatchError` naming
both. One :data:`CONTROLNETS` row per diffusers class (SDXL, SD3, FLUX). A lone safetensors file
(diffusers names without config.json, or an SDXL net in the original cldm names) is read by
:mod:`.controlnet_files`: its config.json inferred from the shapes and the base model, then loaded
as a folder would be.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, FamilyMismatchError
from ..models.configs import UNetConfig
from ..models.controlnet_flux import FluxControlNetConfig
from ..models.controlnet_sd3 import MMDiTControlNet, MMDiTControlNetConfig
from ..models.controlnet_unet import UNetControlNet, UNetControlNetConfig
from ..models.controlnet_xlabs import XLabsControlNetConfig, flux_controlnet
from . import described, fields
from .controlnet_files import read_single_file
from .describe import detect_layout
from .keymaps import Segment, flux_from_diffusers, sd3_from_diffusers, unet_from_diffusers
from .materialize import materialize
from .plan import make_plan
from .source import folder_json, open_checkpoint

# config.json fields of the ControlNet classes beyond their base model's (fields.UNET / fields.SD3)
UNET_CONTROLNET_FIELDS = {
    "conditioning_channels": ("honoured", "UNetControlNetConfig.conditioning_channels"),
    "conditioning_embedding_out_channels": ("honoured", "UNetControlNetConfig.embedding_channels"),
    "controlnet_conditioning_channel_order": ("honoured", "UNetControlNetConfig.bgr (rgb or bgr)"),
    "global_pool_conditions": ("refused", (False,)),
}
SD3_CONTROLNET_FIELDS = {
    "extra_conditioning_channels": ("honoured", "MMDiTControlNetConfig.extra_conditioning_channels"),
    "force_zeros_for_pooled_projection": ("honoured", "the pipeline hands zeros for the pooled text"),
    "pos_embed_type": ("refused", ("sincos",)),
    "use_pos_embed": ("refused", (True,)),
    "joint_attention_dim": ("honoured", "the text width; null (SD3.5's single-stream ControlNets) refused"),
}
FLUX_CONTROLNET_FIELDS = {
    "num_mode": ("honoured", "FluxControlNetConfig.num_mode (union ControlNets: control_mode=)"),
    # XLabs nets: the control image through input_hint_block, packed 2x2 (their patch_size 2)
    "conditioning_embedding_channels": ("honoured", "XLabsControlNetConfig.hint_channels"),
}


def _refuse(path, table: dict, cfg: dict) -> None:
    for name, (rule, allowed) in table.items():
        if rule == "refused" and name in cfg and not any(cfg[name] == a for a in allowed):
            raise CheckpointError(path, f"config.json {name} is {cfg[name]!r}; fastflow computes only with "
                                  f"{' or '.join(map(repr, allowed))}", "this ControlNet needs math fastflow does not "
                                  "implement: use diffusers for it")  # fmt: skip


def unet_controlnet_config(cfg: dict, path) -> UNetControlNetConfig:
    """A ControlNetModel config.json: the UNet fields as an SDXL UNet's (:func:`described.unet_from_diffusers`,
    which checks them against :data:`fields.UNET`), and the control embedding's."""
    _refuse(path, UNET_CONTROLNET_FIELDS, cfg)
    unet = described.unet_from_diffusers({k: v for k, v in cfg.items() if k != "_class_name"}, "controlnet")
    order = cfg.get("controlnet_conditioning_channel_order", "rgb")
    if order not in ("rgb", "bgr"):
        raise CheckpointError(path, f"config.json controlnet_conditioning_channel_order is {order!r}", "use rgb or bgr")
    base = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetConfig)}
    return UNetControlNetConfig(
        **base,
        conditioning_channels=int(cfg.get("conditioning_channels") or 3),
        embedding_channels=tuple(cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
        bgr=order == "bgr",
    )


def sd3_controlnet_config(cfg: dict, path) -> MMDiTControlNetConfig:
    """An SD3ControlNetModel config.json: the MMDiT fields (:func:`described.mmdit_from_diffusers`,
    checked against :data:`fields.SD3`), and the control input's."""
    _refuse(path, SD3_CONTROLNET_FIELDS, cfg)
    if "joint_attention_dim" in cfg and cfg["joint_attention_dim"] is None:
        raise CheckpointError(path, "a ControlNet without a text stream (joint_attention_dim null: SD3.5's "
                              "single-stream layout) is not supported yet", "use an InstantX-style SD3 ControlNet "
                              "(joint blocks), or diffusers")  # fmt: skip
    mmdit = described.mmdit_from_diffusers({k: v for k, v in cfg.items() if k != "_class_name"}, "controlnet")
    base = {f.name: getattr(mmdit, f.name) for f in dataclasses.fields(mmdit)}
    return MMDiTControlNetConfig(
        **base,
        extra_conditioning_channels=int(cfg.get("extra_conditioning_channels") or 0),
        force_zeros_for_pooled_projection=bool(cfg.get("force_zeros_for_pooled_projection", True)),
    )


def _xlabs(cfg: dict) -> bool:
    return cfg.get("_class_name") == "FluxControlNetModel" and cfg.get("conditioning_embedding_channels") is not None


def _table_view(cfg: dict) -> dict:
    """What :func:`fields.check` sees: an XLabs net's patch_size (2: its hint maps are packed 2x2,
    the transformer's tokens are not patched) is checked by :func:`flux_controlnet_config`."""
    return {k: v for k, v in cfg.items() if k != "patch_size"} if _xlabs(cfg) else cfg


def flux_controlnet_config(cfg: dict, path) -> FluxControlNetConfig:
    """A FluxControlNetModel config.json: the FLUX fields (:func:`described.flux_from_diffusers`,
    checked against :data:`fields.FLUX`), the union's mode count, an XLabs net's hint channels."""
    hint = cfg.get("conditioning_embedding_channels")
    if hint is not None and (cfg.get("patch_size") != 2 or cfg.get("num_mode") is not None or hint * 4 != cfg.get(
            "in_channels", 64)):  # fmt: skip
        raise CheckpointError(path, f"config.json conditioning_embedding_channels {hint!r} (an XLabs net's "
                              "input_hint_block) needs patch_size 2, no num_mode and 4 x it = in_channels",
                              "fix config.json")  # fmt: skip
    flux = described.flux_from_diffusers(
        {k: v for k, v in cfg.items() if k not in ("_class_name", "patch_size" if hint else "")}, "controlnet"
    )
    base = {f.name: getattr(flux, f.name) for f in dataclasses.fields(flux)}
    modes = cfg.get("num_mode")
    if modes is not None and (not isinstance(modes, int) or isinstance(modes, bool) or modes < 1):
        raise CheckpointError(path, f"config.json num_mode is {modes!r}", "a positive integer or null")
    if hint is not None:
        return XLabsControlNetConfig(**base, hint_channels=int(hint))  # base_depth: load_controlnet's
    return FluxControlNetConfig(**base, num_mode=modes)


def flux_controlnet_keys(key: str, config) -> list[Segment]:
    """Sources, in diffusers FluxControlNetModel names, of one of our tensors (an XLabs net's
    input_hint_block: convs at even indices, diffusers' conv_in, blocks 0..5, conv_out)."""
    if key.startswith("input_hint_block."):
        _, index, param = key.split(".")
        i = int(index)
        inner = "conv_in" if i == 0 else "conv_out" if i == 14 else f"blocks.{i // 2 - 1}"
        return [Segment(f"input_hint_block.{inner}.{param}")]
    if key.startswith(("controlnet_blocks.", "controlnet_single_blocks.", "controlnet_x_embedder.",
                       "controlnet_mode_embedder.")):  # fmt: skip
        return [Segment(key)]
    return flux_from_diffusers(key, config)


def unet_controlnet_keys(key: str, config) -> list[Segment]:
    """Sources, in diffusers ControlNetModel names, of one of our (cldm-named) tensors."""
    name, _, param = key.rpartition(".")
    parts = name.split(".")
    if parts[0] == "input_hint_block":
        i, last = int(parts[1]), 4 * len(config.embedding_channels) - 2
        inner = "conv_in" if i == 0 else "conv_out" if i == last else f"blocks.{i // 2 - 1}"
        return [Segment(f"controlnet_cond_embedding.{inner}.{param}")]
    if parts[0] == "zero_convs":
        return [Segment(f"controlnet_down_blocks.{parts[1]}.{param}")]
    if parts[0] == "middle_block_out":
        return [Segment(f"controlnet_mid_block.{param}")]
    return unet_from_diffusers(key, config)


def sd3_controlnet_keys(key: str, config) -> list[Segment]:
    """Sources, in diffusers SD3ControlNetModel names, of one of our tensors (no block is pre-only)."""
    if key.startswith(("controlnet_blocks.", "pos_embed_input.")):
        return [Segment(key)]
    return sd3_from_diffusers(key, config.replace(depth=config.depth + 1))


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet class: the base family it drives, its module, config reader and key map."""

    family: str
    model: Callable  # config -> the module
    read_config: Callable  # (config.json dict, path) -> the module's config
    key_map: Callable  # (our key, config) -> its diffusers sources


CONTROLNETS = {
    "ControlNetModel": ControlSpec("sdxl", UNetControlNet, unet_controlnet_config, unet_controlnet_keys),
    "SD3ControlNetModel": ControlSpec("sd3", MMDiTControlNet, sd3_controlnet_config, sd3_controlnet_keys),
    "FluxControlNetModel": ControlSpec("flux", flux_controlnet, flux_controlnet_config, flux_controlnet_keys),
}
FAMILY_TITLES = {"flux": "FLUX.1", "sd3": "SD3 / SD3.5", "sdxl": "SDXL"}
NOT_YET = {
    "FluxMultiControlNetModel": "a FluxMultiControlNetModel folder is not loaded as one: pass each "
    "ControlNet's folder (fastflow.load(model, controlnet=[a, b]))",
    "ControlNetUnionModel": "SDXL union ControlNets (control modes) are not supported yet",
}


@dataclass(frozen=True)
class _Description:
    """What :func:`~.plan.make_plan` reads of a description: the layout, the config, the spec."""

    layout: object
    config: object
    spec: ControlSpec


def _width_checks(family: str, net, base) -> dict[str, tuple]:
    """What must agree between a ControlNet's config and its base model's: (net's, base's)."""
    if family == "sdxl":
        names = ("in_channels", "model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels")
    elif family == "flux":  # the residuals' width, what the net reads of the latents and the text
        names = ("hidden_size", "in_channels", "context_in_dim", "vec_in_dim")
    else:
        names = ("hidden_size", "patch_size", "in_channels", "context_in_dim", "adm_in_dim")
    out = {n: (getattr(net, n), getattr(base, n)) for n in names if getattr(net, n) != getattr(base, n)}
    if family == "sdxl" and out.get("in_channels", (0, 0))[1] == 2 * net.in_channels + 1:
        del out["in_channels"]  # an inpainting UNet's net reads the latent channels only (diffusers)
    return out


def check_family(path, family: str, base_config) -> None:
    """A ControlNet of another family than the base: FamilyMismatchError naming both."""
    if family != base_config.family:
        raise FamilyMismatchError(
            path,
            f"this is a {FAMILY_TITLES[family]} ControlNet; the base model {base_config.name} is "
            f"{FAMILY_TITLES.get(base_config.family, base_config.family)}",
            "load a ControlNet trained for this base model's family",
        )


def check_fits(path, family: str, config, base_config) -> None:
    """A ControlNet of another family than the base, or of other widths: FamilyMismatchError naming both."""
    check_family(path, family, base_config)
    if family == "flux" and (base_config.conditioning or base_config.kontext):
        raise FamilyMismatchError(path, f"ControlNets drive FLUX.1 dev / schnell; {base_config.name} is a "
                                  f"{'Kontext' if base_config.kontext else base_config.conditioning} model",
                                  "load FLUX.1 dev (or schnell) with the ControlNet")  # fmt: skip
    if family == "flux" and config.guidance_embed and not base_config.guidance_embed:
        raise FamilyMismatchError(path, "this ControlNet embeds the guidance scale (a FLUX.1 dev ControlNet); "
                                  f"{base_config.name} has no guidance embedding", "use FLUX.1 dev")  # fmt: skip
    differ = _width_checks(family, config, base_config)
    if differ:
        shown = ", ".join(f"{n} {a} vs the base's {b}" for n, (a, b) in differ.items())
        raise FamilyMismatchError(
            path,
            f"this ControlNet was built for a model of other widths than the base {base_config.name} ({shown})",
            "load the ControlNet trained for this base model (e.g. SD3.5-large's for SD3.5-large)",
        )


def _config_beside(path: Path) -> dict | None:
    """The config.json of a ControlNet folder when ``path`` is one of its weight files: it is read
    (its fields are honoured or refused) rather than inferred from the shapes."""
    if not path.is_file() or not (path.parent / "config.json").is_file():
        return None
    cfg = folder_json(path.parent, "config.json")
    cls = str(cfg.get("_class_name", ""))
    return cfg if cls in CONTROLNETS or cls in NOT_YET else None


def load_controlnet(
    path: str | os.PathLike, base_config, dtype: torch.dtype = torch.float32, device="cpu", quant=None
) -> torch.nn.Module:
    """A ControlNet from a diffusers folder or a single safetensors file (:mod:`.controlnet_files`),
    checked to fit a base model of ``base_config``.
    ``quant`` as :func:`~.loader.load_transformer`'s (FP8 / int8 apply to its linear layers)."""
    path = Path(path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(path, "no config.json in this ControlNet folder", "pass a diffusers ControlNet folder "
                              "(config.json + *.safetensors)")  # fmt: skip
    beside = _config_beside(path)
    with open_checkpoint(path) as source:
        single = read_single_file(source) if path.is_file() and not beside else None
        if single:
            check_family(path, single.family, base_config)  # the base's head widths etc. fill its config
        cfg = beside or (single.config(base_config) if single else source.folder_config)
        cls = str(cfg.get("_class_name", ""))
        if cls in NOT_YET:
            raise CheckpointError(path, NOT_YET[cls], "use diffusers for this ControlNet")
        if cls not in CONTROLNETS:
            raise FamilyMismatchError(path, f"config.json names {cls or 'no class'}, not a ControlNet fastflow knows "
                                      f"({', '.join(CONTROLNETS)})", "pass a ControlNet folder")  # fmt: skip
        spec = CONTROLNETS[cls]
        fields.check(spec.family, _table_view(cfg), path)
        try:
            config = spec.read_config(cfg, path)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(path, f"config.json cannot be read as a {cls} config ({e})"[:300],
                                  "fix config.json") from None  # fmt: skip
        check_fits(path, spec.family, config, base_config)
        if isinstance(config, XLabsControlNetConfig):  # its residuals repeat over the base's double blocks
            config = config.replace(base_depth=base_config.depth)
        if single:
            layout = single.layout
            spec = dataclasses.replace(spec, key_map=single.key_map or spec.key_map)
        else:
            layout = dataclasses.replace(detect_layout(source.key_file), naming="diffusers", prefix="")
        plan = make_plan(source, _Description(layout, config, spec), dtype, device, quant)
        return materialize(source, plan)
