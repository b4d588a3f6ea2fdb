"""The config files of a Stable Video Diffusion diffusers folder read into fastflow's configs, every
field honoured or refused (:mod:`.fields`' ``svd_unet``, ``svd_vae``, ``clip_vision``,
``svd_image_processor`` and ``svd_scheduler`` tables): ``unet/config.json`` -> :class:`SVDUNetConfig`,
``vae/config.json`` -> :class:`VideoVAEConfig`, ``image_encoder/config.json`` ->
:class:`CLIPVisionConfig`, ``feature_extractor/preprocessor_config.json`` -> the normalisation,
``scheduler/scheduler_config.json`` -> the EDM settings. A value of the wrong type, a size out of
bounds or a contradiction is a :class:`CheckpointError` naming the file and field.
"""

from __future__ import annotations

import math

from ..errors import CheckpointError, InputError
from ..models import configs as registry
from ..models.clip_vision import CLIPVisionConfig
from ..models.configs_svd import SVDUNetConfig
from ..models.vae_video import VIDEO_VAE_CONFIGS, VideoVAEConfig
from . import fields

_MAX_SIZE = 1 << 16  # widths, channels, frames: far above every released size


def _int(raw: dict, name: str, path, default=None, low: int = 1, high: int = _MAX_SIZE) -> int:
    value = raw.get(name, default)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise CheckpointError(path, f"config.json {name} is {value!r}, not an integer in {low}..{high}",
                              "fix or re-download the config file")  # fmt: skip
    return value


def _levels(raw: dict, name: str, default) -> int:
    value = raw.get(name, default)
    return len(value) if isinstance(value, (list, tuple)) else 1


def _ints(raw: dict, name: str, path, n: int, default) -> tuple[int, ...]:
    """A per-level field: one integer for every level, or a list of ``n``."""
    value = raw.get(name, default)
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise CheckpointError(path, f"config.json {name} has {len(values)} entries for {n} levels", "fix the file")
    return tuple(_int({name: v}, name, path) for v in values)


def _config(cls, path, **fields_):
    try:
        return cls(**fields_)
    except (ValueError, TypeError, InputError) as e:
        raise CheckpointError(path, f"config.json describes no model fastflow can build ({e})"[:300],
                              "fix or re-download the config file") from None  # fmt: skip


def _registered_name(config, candidates) -> str:
    """The name of a registered config equal to ``config`` but for its name, else a descriptive one."""
    for known in candidates:
        if known.replace(name=config.name) == config:
            return known.name
    return config.name


def _class(raw: dict, path, want: str) -> None:
    if raw.get("_class_name", want) != want:
        raise CheckpointError(path, f"config.json names {raw.get('_class_name')!r}, not {want}",
                              "pass a Stable Video Diffusion folder")  # fmt: skip


_DOWN = {True: "CrossAttnDownBlockSpatioTemporal", False: "DownBlockSpatioTemporal"}
_UP = {True: "CrossAttnUpBlockSpatioTemporal", False: "UpBlockSpatioTemporal"}


def unet_config(raw: dict, path) -> SVDUNetConfig:
    """A UNetSpatioTemporalConditionModel config.json (absent fields: diffusers' defaults)."""
    path = path / "config.json"
    fields.check("svd_unet", raw, path)
    _class(raw, path, "UNetSpatioTemporalConditionModel")
    default = (320, 640, 1280, 1280)
    widths = _ints(raw, "block_out_channels", path, _levels(raw, "block_out_channels", default), default)
    n = len(widths)
    down = raw.get("down_block_types", [_DOWN[True]] * 3 + [_DOWN[False]])
    if not isinstance(down, (list, tuple)) or len(down) != n or any(d not in _DOWN.values() for d in down):
        raise CheckpointError(path, f"config.json down_block_types {down!r}: fastflow builds {n} levels of "
                              f"{' / '.join(_DOWN.values())}", "use diffusers for this model")  # fmt: skip
    attention = [d == _DOWN[True] for d in down]
    up = raw.get("up_block_types", [_UP[a] for a in reversed(attention)])
    if list(up) != [_UP[a] for a in reversed(attention)]:
        raise CheckpointError(path, f"config.json up_block_types {up!r} do not mirror down_block_types {down!r}",
                              "use diffusers for this model")  # fmt: skip
    if any(w % widths[0] for w in widths):
        raise CheckpointError(path, f"config.json block_out_channels {list(widths)} are not multiples of the first",
                              "use diffusers for this model")  # fmt: skip
    depth = _ints(raw, "transformer_layers_per_block", path, n, 1)
    time_id = _int(raw, "addition_time_embed_dim", path, 256)
    adm = _int(raw, "projection_class_embeddings_input_dim", path, 768)
    if adm != 3 * time_id:
        raise CheckpointError(path, f"config.json projection_class_embeddings_input_dim {adm} is not 3 x "
                              f"addition_time_embed_dim {time_id} (fps, motion bucket, noise augmentation)",
                              "fix the file")  # fmt: skip
    config = _config(
        SVDUNetConfig, path, name="svd (config.json)",
        in_channels=_int(raw, "in_channels", path, 8), out_channels=_int(raw, "out_channels", path, 4),
        model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=_int(raw, "layers_per_block", path, 2),
        transformer_depth=tuple(d if a else 0 for d, a in zip(depth, attention, strict=True)),
        transformer_depth_middle=depth[-1], num_heads=_ints(raw, "num_attention_heads", path, n, (5, 10, 20, 20)),
        context_dim=_int(raw, "cross_attention_dim", path, 1024), time_id_dim=time_id,
        num_frames=_int(raw, "num_frames", path, 25, high=4096),
    )  # fmt: skip
    return config.replace(name=_registered_name(config, registry.configs_of("svd")))


def vae_config(raw: dict, path) -> VideoVAEConfig:
    """An AutoencoderKLTemporalDecoder config.json (absent fields: diffusers' defaults)."""
    path = path / "config.json"
    fields.check("svd_vae", raw, path)
    _class(raw, path, "AutoencoderKLTemporalDecoder")
    widths = _ints(raw, "block_out_channels", path, _levels(raw, "block_out_channels", (64,)), (64,))
    down = raw.get("down_block_types", ["DownEncoderBlock2D"])
    if not isinstance(down, (list, tuple)) or len(down) != len(widths) or set(down) != {"DownEncoderBlock2D"}:
        raise CheckpointError(path, f"config.json down_block_types {down!r}: one DownEncoderBlock2D per width",
                              "use diffusers for this VAE")  # fmt: skip
    if _int(raw, "layers_per_block", path, 1) != 2:
        raise CheckpointError(path, f"config.json layers_per_block is {raw.get('layers_per_block', 1)!r}; fastflow's "
                              "temporal decoder is sgm's (2 ResNet blocks a level, a two-block mid)",
                              "use diffusers for this VAE")  # fmt: skip
    if any(w % widths[0] for w in widths):
        raise CheckpointError(path, f"config.json block_out_channels {list(widths)} are not multiples of the first",
                              "use diffusers for this VAE")  # fmt: skip
    scale = raw.get("scaling_factor", 0.18215)
    upcast = raw.get("force_upcast", True)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not isinstance(upcast, bool):
        raise CheckpointError(path, f"config.json scaling_factor {scale!r} / force_upcast {upcast!r}", "fix the file")
    config = _config(
        VideoVAEConfig,
        path,
        name="svd-vae (config.json)",
        ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=2,
        z_channels=_int(raw, "latent_channels", path, 4),
        in_channels=_int(raw, "in_channels", path, 3),
        out_channels=_int(raw, "out_channels", path, 3),
        scale_factor=float(scale),
        force_upcast=upcast,
    )
    return config.replace(name=_registered_name(config, VIDEO_VAE_CONFIGS.values()))


_VISION_INTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "projection_dim": 512,
}  # fmt: skip


def image_encoder_config(raw: dict, path) -> CLIPVisionConfig:
    """A transformers CLIPVisionConfig config.json (CLIPVisionModelWithProjection)."""
    path = path / "config.json"
    if not raw:
        raise CheckpointError(path, "no config.json for the image encoder", "pass a complete SVD diffusers folder")
    fields.check("clip_vision", raw, path)
    if raw.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(path, f"config.json model_type is {raw['model_type']!r}, not clip_vision_model",
                              "pass SVD's image_encoder/ (a CLIPVisionModelWithProjection)")  # fmt: skip
    sizes = {k: _int(raw, k, path, v, high=1 << 20) for k, v in _VISION_INTS.items()}
    eps = raw.get("layer_norm_eps", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise CheckpointError(path, f"config.json layer_norm_eps is {eps!r}", "fix the file")
    act = raw.get("hidden_act", "quick_gelu")
    return _config(CLIPVisionConfig, path, **sizes, hidden_act=act, layer_norm_eps=float(eps))


def _triple(value, name: str, path, positive: bool) -> tuple[float, float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok or (positive and min(value) <= 0):
        raise CheckpointError(path, f"preprocessor_config.json {name} is {value!r}, not three finite numbers"
                              + (" above 0" if positive else ""), "fix the file")  # fmt: skip
    return tuple(float(v) for v in value)


def image_processor_stats(raw: dict, path, mean, std) -> tuple[tuple, tuple]:
    """(image_mean, image_std) of a CLIPImageProcessor preprocessor_config.json (``mean`` / ``std``
    where it states none)."""
    path = path / "preprocessor_config.json"
    fields.check("svd_image_processor", raw, path, "preprocessor_config.json")
    return (
        _triple(raw.get("image_mean", mean), "image_mean", path, False),
        _triple(raw.get("image_std", std), "image_std", path, True),
    )


def scheduler_settings(raw: dict, path, defaults: dict) -> dict:
    """The EDM settings of an EulerDiscreteScheduler scheduler_config.json, every field that changes
    the math checked (``defaults``: SVD's, for a folder without one). diffusers' own defaults for an
    absent field differ from SVD's (epsilon, discrete timesteps, no Karras): such a file is refused
    by the table as written; absent fields take SVD's values only where the file is absent."""
    if not raw:
        return dict(defaults)
    where = path / "scheduler_config.json"
    fields.check("svd_scheduler", raw, where, "scheduler_config.json")
    settings = dict(defaults)
    for name in ("prediction_type", "timestep_type", "use_karras_sigmas", "timestep_spacing"):
        if name not in raw:
            raise CheckpointError(where, f"scheduler_config.json states no {name}; diffusers' default for it is not "
                                  f"SVD's ({defaults[name]!r})", f"add \"{name}\": {defaults[name]!r}")  # fmt: skip
    for name in ("sigma_min", "sigma_max"):
        value = raw.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise CheckpointError(where, f"scheduler_config.json {name} is {value!r}, not a positive number",
                                  "SVD's scheduler states sigma_min 0.002 and sigma_max 700.0")  # fmt: skip
        settings[name] = float(value)
    if settings["sigma_min"] >= settings["sigma_max"]:
        raise CheckpointError(where, f"scheduler_config.json sigma_min {settings['sigma_min']} is not below "
                              f"sigma_max {settings['sigma_max']}", "fix the file")  # fmt: skip
    return settings
