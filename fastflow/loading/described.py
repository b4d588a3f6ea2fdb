"""What a folder's ``config.json`` or the user says about a config, for the description stage.

Configs for transformers no registered config fits (fine-tunes with fewer blocks, distilled
"lite" models, test models): from the diffusers folder's ``config.json``, or from the fields a
user gives (``fastflow.load(..., config={...})``, CLI ``--config JSON``). Either way the loader
then checks the config against the tensors, as for a registered one. Also what a folder's
``config.json`` adds to a registered config (SDXL's head / time-id widths, a VAE's latent scale,
shift and upcast). :mod:`.families` names each family's readers.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..errors import CheckpointError, InputError
from ..models import configs as registry
from . import fields
from .source import CheckpointSource


def _get(cfg: dict, key: str, default):
    value = cfg.get(key, default)
    return default if value is None else value


def flux_from_diffusers(cfg: dict, name: str, kontext: bool = False, depth: bool = False) -> registry.FluxConfig:
    """FluxConfig from a FluxTransformer2DModel ``config.json`` (diffusers' own defaults for absent
    keys). Sampling facts the weights cannot show follow FLUX.1's: guidance-distilled -> dev's,
    else schnell's."""
    fields.check("flux", cfg, name)
    if _get(cfg, "patch_size", 1) != 1:
        raise InputError(f"{name}: FLUX config.json with patch_size {cfg['patch_size']} (FLUX.1 models use 1)")
    heads, head_dim = _get(cfg, "num_attention_heads", 24), _get(cfg, "attention_head_dim", 128)
    in_channels = _get(cfg, "in_channels", 64)
    guidance = bool(_get(cfg, "guidance_embeds", False))
    conditioned = registry.flux_conditioned_sampling(in_channels, _get(cfg, "out_channels", in_channels), depth)
    if kontext:
        sampling = registry.FLUX_KONTEXT_SAMPLING
    elif conditioned is not None:  # FLUX.1 Fill / Canny / Depth: img_in wider than the output
        sampling = conditioned
    else:
        sampling = registry.FLUX_DEV_SAMPLING if guidance else registry.FLUX_SCHNELL_SAMPLING
    return registry.FluxConfig(
        name=name,
        in_channels=in_channels,
        out_channels=_get(cfg, "out_channels", in_channels),
        vec_in_dim=_get(cfg, "pooled_projection_dim", 768),
        context_in_dim=_get(cfg, "joint_attention_dim", 4096),
        hidden_size=heads * head_dim,
        num_heads=heads,
        depth=_get(cfg, "num_layers", 19),
        depth_single_blocks=_get(cfg, "num_single_layers", 38),
        axes_dim=tuple(_get(cfg, "axes_dims_rope", (16, 56, 56))),
        guidance_embed=guidance,
        shift_schedule=guidance,  # dev-like models use the resolution-shifted schedule, schnell-like not
        kontext=kontext,
        sampling=sampling,
    )


def mmdit_from_diffusers(cfg: dict, name: str) -> registry.MMDiTConfig:
    """MMDiTConfig from an SD3Transformer2DModel ``config.json``; SD3.5 sampling defaults where
    the model has qk-norm (every SD3.5), SD3-medium's otherwise."""
    fields.check("sd3", cfg, name)
    heads, head_dim = _get(cfg, "num_attention_heads", 18), _get(cfg, "attention_head_dim", 64)
    hidden = heads * head_dim
    caption = _get(cfg, "caption_projection_dim", hidden)
    if caption != hidden:
        raise InputError(f"{name}: caption_projection_dim {caption} differs from the width {hidden} (not an MMDiT)")
    qk_norm = _get(cfg, "qk_norm", None) == "rms_norm"
    in_channels = _get(cfg, "in_channels", 16)
    return registry.MMDiTConfig(
        name=name,
        depth=_get(cfg, "num_layers", 18),
        hidden_size=hidden,
        num_heads=heads,
        patch_size=_get(cfg, "patch_size", 2),
        in_channels=in_channels,
        out_channels=_get(cfg, "out_channels", in_channels),
        context_in_dim=_get(cfg, "joint_attention_dim", 4096),
        adm_in_dim=_get(cfg, "pooled_projection_dim", 2048),
        pos_embed_max_size=_get(cfg, "pos_embed_max_size", 96),
        qk_norm=qk_norm,
        dual_attention_layers=tuple(_get(cfg, "dual_attention_layers", ())),
        sampling=registry.SD35_SAMPLING if qk_norm else registry.SD3_MEDIUM_SAMPLING,
    )


def _per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


_UP_OF_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


def _check_block_types(cfg: dict, down: list, name: str) -> None:
    """SDXL's UNet: every down block a known kind and the up blocks their mirror (fastflow builds
    the decoder as the encoder reversed); another list is another architecture, refused."""
    bad = [t for t in down if t not in _UP_OF_DOWN]
    mirror = [_UP_OF_DOWN[t] for t in reversed(down)] if not bad else None
    up = list(_get(cfg, "up_block_types", mirror or ()))
    if bad or up != mirror:
        field, value = ("down_block_types", down) if bad else ("up_block_types", up)
        raise InputError(
            f"{name}: config.json {field} is {value!r}; fastflow's UNet has {', '.join(_UP_OF_DOWN)} down blocks "
            "and their mirror (UpBlock2D / CrossAttnUpBlock2D, reversed) as up blocks"
        )


def unet_from_diffusers(cfg: dict, name: str) -> registry.UNetConfig:
    """UNetConfig from an SDXL-style UNet2DConditionModel ``config.json`` ("text_time" added
    embedding). diffusers' ``attention_head_dim`` counts heads (its old naming) unless
    ``num_attention_heads`` is given; sampling follows SDXL base's, Turbo's for trailing spacing."""
    fields.check("sdxl", cfg, name)
    if _get(cfg, "addition_embed_type", None) != "text_time":
        raise InputError(f"{name}: a UNet without SDXL's text_time conditioning (SD 1.x / 2.x) is not supported")
    widths = list(_get(cfg, "block_out_channels", (320, 640, 1280)))
    types = list(_get(cfg, "down_block_types", ()))
    _check_block_types(cfg, types, name)
    depth = _per_level(_get(cfg, "transformer_layers_per_block", 1), len(widths))
    heads = _per_level(_get(cfg, "num_attention_heads", None) or _get(cfg, "attention_head_dim", 8), len(widths))
    attn = [i for i, t in enumerate(types) if "CrossAttn" in t]
    head_dims = {widths[i] // heads[i] for i in attn} or {64}
    if len(head_dims) != 1:
        raise InputError(f"{name}: UNet levels with different head widths {sorted(head_dims)} are not supported")
    layers = _get(cfg, "layers_per_block", 2)
    if not isinstance(layers, int):
        raise InputError(f"{name}: layers_per_block must be one number for every level, got {layers!r}")
    in_channels = _get(cfg, "in_channels", 4)
    return registry.UNetConfig(
        name=name,
        in_channels=in_channels,
        out_channels=_get(cfg, "out_channels", in_channels),
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=layers,
        transformer_depth=tuple(depth[i] if i in attn else 0 for i in range(len(widths))),
        transformer_depth_middle=depth[-1],
        context_dim=_get(cfg, "cross_attention_dim", 2048),
        head_dim=head_dims.pop(),
        adm_in_channels=_get(cfg, "projection_class_embeddings_input_dim", 2816),
        time_id_dim=_get(cfg, "addition_time_embed_dim", 256),
        norm_groups=_get(cfg, "norm_num_groups", 32),
    )


def _class_name(source: CheckpointSource) -> str:
    return str(source.folder_config.get("_class_name", ""))


# A family's folder reader: the config a diffusers model folder's ``config.json`` describes, or
# None when it describes none of ours (no config.json, another class).
def flux_from_folder(source: CheckpointSource, name: str) -> registry.FluxConfig | None:
    if _class_name(source) != "FluxTransformer2DModel":
        return None
    naming = f"{source.pipeline_class or ''} {source.folder_config.get('_name_or_path', '')}".lower()
    return flux_from_diffusers(source.folder_config, name, kontext="kontext" in naming, depth="depth" in naming)


def mmdit_from_folder(source: CheckpointSource, name: str) -> registry.MMDiTConfig | None:
    if _class_name(source) != "SD3Transformer2DModel":
        return None
    return mmdit_from_diffusers(source.folder_config, name)


def unet_from_folder(source: CheckpointSource, name: str) -> registry.UNetConfig | None:
    if _class_name(source) != "UNet2DConditionModel":
        return None
    return unet_from_diffusers(source.folder_config, name)


def _told(reader, source: CheckpointSource, cfg):
    """The config a folder's config.json describes (``reader``), refused where its architecture
    contradicts the tensors' (``cfg``): a field the weights decide (widths, depth, channels, block
    types) is honoured by the tensors and must agree, never silently overridden. None: no config.json."""
    try:
        told = reader(source, cfg.name)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # junk values in config.json
        raise CheckpointError(source.path, f"config.json cannot be read as this model's config ({e})"[:300],
                              "fix or remove config.json") from None  # fmt: skip
    if told is not None and told.arch() != cfg.arch():
        fields_ = [f.name for f in dataclasses.fields(cfg) if getattr(told, f.name, None) != getattr(cfg, f.name)]
        differ = [f for f in fields_ if f not in ("name", "sampling")]
        raise CheckpointError(
            source.path,
            f"config.json describes another architecture than the tensors ({', '.join(differ) or 'shape'} differ)",
            "the folder's config.json does not belong to its weights: fix or remove it",
        )
    return told


# A family's refinement: what a folder's config.json changes in the registered config that fits
# the tensors (applied unless the user gave config=).
def unet_refined(cfg: registry.UNetConfig, source: CheckpointSource) -> registry.UNetConfig:
    """Head and time-id widths and GroupNorm groups: config.json's, where it has them; the
    timestep spacing: scheduler_config.json's, whose other fields are checked (:mod:`.fields`)."""
    told = _told(unet_from_folder, source, cfg)
    if told is not None:
        seen = (told.head_dim, told.time_id_dim, told.norm_groups)
        if seen != (cfg.head_dim, cfg.time_id_dim, cfg.norm_groups):
            cfg = cfg.replace(head_dim=seen[0], time_id_dim=seen[1], norm_groups=seen[2])
    scheduler = source.scheduler_config
    if scheduler:
        fields.check("sdxl_scheduler", scheduler, source.path, "scheduler_config.json")
        spacing = scheduler.get("timestep_spacing", "linspace")  # diffusers' default
        if spacing not in fields.SPACINGS:
            raise CheckpointError(
                source.path,
                f"scheduler_config.json timestep_spacing is {spacing!r}; fastflow knows {', '.join(fields.SPACINGS)}",
                "fix scheduler_config.json",
            )
        if spacing != cfg.spacing:
            cfg = cfg.replace(spacing=spacing)
    return cfg


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


def flow_refined(cfg, source: CheckpointSource):
    """FLUX / SD3: a pipeline folder's scheduler_config.json checked (:data:`.fields.FLOW_SCHEDULER`);
    SD3's ``shift`` and FLUX's ``use_dynamic_shifting`` honoured."""
    scheduler = source.scheduler_config
    if not scheduler:
        return cfg
    fields.check("flow_scheduler", scheduler, source.path, "scheduler_config.json")
    shift, dynamic = scheduler.get("shift", 1.0), scheduler.get("use_dynamic_shifting", False)
    flux = cfg.family == "flux"
    ok_shift = isinstance(shift, (int, float)) and not isinstance(shift, bool) and math.isfinite(shift) and shift > 0
    if not isinstance(dynamic, bool) or not ok_shift or dynamic and not flux or flux and not dynamic and shift != 1.0:
        raise CheckpointError(
            source.path,
            f"scheduler_config.json shift {shift!r} / use_dynamic_shifting {dynamic!r}: fastflow's "
            + (
                "FLUX shifts by resolution (dynamic) or not at all (shift 1.0)"
                if flux
                else "SD3 takes a fixed shift > 0"
            ),
            "use diffusers for this model, or fix scheduler_config.json",
        )
    if flux and dynamic != cfg.shift_schedule:
        return cfg.replace(shift_schedule=dynamic)
    if not flux and float(shift) != cfg.shift:
        return cfg.replace(shift=float(shift))
    return cfg


def vae_from_folder(source: CheckpointSource, name: str) -> registry.VAEConfig | None:
    """VAEConfig from an AutoencoderKL ``config.json`` (widths, depth, latent channels, groups,
    scale / shift, upcast; :data:`.fields.VAE`), for VAEs no registered config fits."""
    cfg = source.folder_config
    if _class_name(source) != "AutoencoderKL":
        return None
    fields.check("vae", cfg, source.path)
    widths = list(_get(cfg, "block_out_channels", (64,)))
    quant, post = bool(_get(cfg, "use_quant_conv", True)), bool(_get(cfg, "use_post_quant_conv", True))
    if quant != post or not widths or any(w % widths[0] for w in widths):
        raise CheckpointError(
            source.path,
            f"config.json block_out_channels {widths} / use_quant_conv {quant} / use_post_quant_conv {post}: "
            "fastflow needs widths that are multiples of the first and both quant convs or neither",
            "use diffusers for this VAE, or fix config.json",
        )
    factors = vae_latent_factors(source) or (0.18215, 0.0)  # diffusers' default scaling_factor
    return registry.VAEConfig(
        name=name,
        ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=_get(cfg, "layers_per_block", 1),
        z_channels=_get(cfg, "latent_channels", 4),
        in_channels=_get(cfg, "in_channels", 3),
        out_channels=_get(cfg, "out_channels", 3),
        scale_factor=factors[0],
        shift_factor=factors[1],
        quant_conv=quant,
        force_upcast=bool(_get(cfg, "force_upcast", True)),
        norm_groups=_get(cfg, "norm_num_groups", 32),
    )


def vae_refined(cfg: registry.VAEConfig, source: CheckpointSource) -> registry.VAEConfig:
    """A VAE folder's config.json scale / shift always apply (registered values are defaults), and
    its force_upcast (the fp16-fix SDXL VAE says False) and norm_num_groups; its other fields
    are checked (:data:`.fields.VAE`)."""
    if _class_name(source) == "AutoencoderKL":
        _told(vae_from_folder, source, cfg)  # config.json's fields checked (.fields.VAE) and its shape
        groups = source.folder_config.get("norm_num_groups", 32)
        if groups != cfg.norm_groups:
            cfg = cfg.replace(norm_groups=groups)
    factors = vae_latent_factors(source)
    if factors is not None and factors != (cfg.scale_factor, cfg.shift_factor):
        cfg = cfg.replace(scale_factor=factors[0], shift_factor=factors[1])
    upcast = source.folder_config.get("force_upcast")
    if isinstance(upcast, bool) and upcast != cfg.force_upcast:
        cfg = cfg.replace(force_upcast=upcast)
    return cfg


def from_fields(family: str, cls: type | None, fields: dict, name: str = "custom"):
    """A config of ``family`` (its config class ``cls``, None for a family config= cannot describe)
    from the fields given (the rest: the full-size model's values)."""
    if cls is None:
        raise InputError(f"config= describes a denoiser (FLUX, SD3 or SDXL), not a {family}")
    known = {f.name for f in dataclasses.fields(cls)} - {"sampling"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise InputError(f"unknown {cls.__name__} field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    values.setdefault("name", name)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise InputError(f"config {fields}: {e}") from None


MAX_CONFIG_ARG = 64 * 1024  # bytes of --config (a real one is < 1 KB)
MAX_CONFIG_INT = 1 << 20  # no real width, depth or count comes near it
_POSITIVE = ("dim", "channels", "size", "heads", "ratio", "theta", "res_blocks")  # field-name endings


def parse_config_arg(text: str) -> dict:
    """CLI ``--config``: a JSON object, inline or in a file, of numbers (finite, >= 0, > 0 for
    sizes, at most 2**20), booleans, short ASCII text and short lists of those."""
    from .files import parse_json, read_limited

    if len(text) > MAX_CONFIG_ARG:
        raise InputError(f"--config is {len(text)} characters (limit {MAX_CONFIG_ARG}): pass a .json file")
    path = Path(text).expanduser()
    try:
        is_file = not text.lstrip().startswith("{") and (path.suffix == ".json" or path.exists())
    except OSError:  # a name too long for the filesystem: not a file
        is_file = False
    try:
        raw = (
            read_limited(path, "--config file", MAX_CONFIG_ARG) if is_file else text.encode("utf-8", "surrogateescape")
        )
        fields = parse_json(raw, path if is_file else None, "--config", max_depth=4)
    except CheckpointError as e:
        raise InputError(f"--config must be a JSON object or a .json file holding one: {e.problem}") from None
    if not isinstance(fields, dict):
        raise InputError(f"--config must be a JSON object, got {type(fields).__name__}")
    for key, value in fields.items():
        _check_config_value(key, value)
    return fields


def _check_config_value(key: str, value) -> None:
    def bad(why: str):
        shown = repr(value)
        return InputError(f"--config {key[:60]!a}: {shown[:60]}{'...' if len(shown) > 60 else ''} {why}")

    if not key.isascii() or len(key) > 64:
        raise bad("is not a config field name (ASCII, at most 64 characters)")
    items = value if isinstance(value, list) else [value]
    if len(items) > 64:
        raise bad(f"has {len(items)} items (limit 64)")
    for item in items:
        if isinstance(item, bool):
            continue
        if isinstance(item, str):
            if not item.isascii() or len(item) > 100:
                raise bad("must be ASCII text of at most 100 characters")
        elif isinstance(item, (int, float)):
            if item < 0 or item > MAX_CONFIG_INT:
                raise bad(f"must be from 0 to {MAX_CONFIG_INT}")
            if item == 0 and key.endswith(_POSITIVE) and not isinstance(value, list):
                raise bad("must be greater than 0 (a size)")
        else:
            raise bad("must be a number, a boolean, text or a list of numbers")
