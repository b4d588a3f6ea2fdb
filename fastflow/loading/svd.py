"""Stable Video Diffusion (issue 36) from local files: the spatio-temporal UNet, the temporal-decoder
VAE and the CLIP image encoder, with the image processor's mean / std and the scheduler's settings.

Two layouts, through the same stages as every component (source: files and headers validated;
config: every field honoured or refused, :mod:`.fields`' ``svd_*`` / ``clip_vision`` tables; plan:
the module on meta, the key map, every name / shape / dtype checked before a weight is read;
materialize):

- a diffusers folder (``model_index.json`` StableVideoDiffusionPipeline: ``unet/``, ``vae/``,
  ``image_encoder/``, ``feature_extractor/``, ``scheduler/``): configs from the config files, keys
  through :mod:`.keymaps_svd` / :mod:`.keymaps_svd_vae` (the image encoder keeps transformers' names);
- an official single file (svd.safetensors, svd_xt.safetensors, svd_xt_1_1.safetensors: sgm's
  names): the UNet under ``model.diffusion_model.``, the decoder under ``first_stage_model.``, the
  encoder + quant_conv under ``conditioner.embedders.3.encoder.``, the image encoder in open_clip's
  names under ``conditioner.embedders.0.open_clip.model.visual.``. The weights cannot tell SVD (14
  frames) from SVD-XT (25): ``variant=``, else the file name, else :class:`AmbiguousVariantError`.
  The known unused groups (:data:`OFFICIAL_UNUSED`) are skipped; any other tensor is refused.
"""

from __future__ import annotations

import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AmbiguousVariantError, CheckpointError, InputError, UnexpectedKeysError
from ..models import configs as registry
from ..models.clip_vision import SVD_IMAGE_ENCODER, CLIPVisionConfig, CLIPVisionModelWithProjection
from ..models.configs_svd import SVDUNetConfig
from ..models.unet_video import VideoUNet
from ..models.vae_video import VIDEO_VAE_CONFIGS, VideoAutoEncoder, VideoVAEConfig
from .keymaps import Segment
from .keymaps_clip_vision import SVD_OPENCLIP_VISUAL_PREFIX, clip_vision_openclip_plan
from .keymaps_svd import svd_unet_from_diffusers
from .keymaps_svd_vae import SVD_VAE_UNUSED_OFFICIAL_PREFIXES, svd_vae_from_diffusers, svd_vae_official_key
from .layout import ENGINE_BUFFERS, Layout
from .materialize import materialize
from .plan import LoadPlan, make_plan, on_meta, validate
from .quantized import split_quant_keys
from .safetensors_io import SafetensorsFile
from .source import folder_json, open_checkpoint, resolve_model
from .svd_config import image_encoder_config, image_processor_stats, scheduler_settings, unet_config, vae_config

UNET_PREFIX = "model.diffusion_model."
# OpenAI CLIP's normalisation (transformers' CLIPImageProcessor defaults): folders without
# feature_extractor/ and the official files
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The scheduler settings of every SVD release (hub scheduler/scheduler_config.json = sgm's EDM setup)
SVD_SCHEDULER = {
    "sigma_min": 0.002,
    "sigma_max": 700.0,
    "use_karras_sigmas": True,
    "prediction_type": "v_prediction",
    "timestep_type": "continuous",
    "timestep_spacing": "leading",
    "final_sigmas_type": "zero",
}
# Groups of an official file that inference does not use: the open_clip text tower's residue, the
# first stage's encoder and the conditioning VAE's decoder (keymaps_svd_vae), sgm engine buffers.
_OPENCLIP_TEXT = (
    r"conditioner\.embedders\.0\.open_clip\.model\."
    r"(token_embedding\.|positional_embedding$|ln_final\.|text_projection$|logit_scale$)"
)
OFFICIAL_UNUSED = (_OPENCLIP_TEXT, *(re.escape(p) for p in SVD_VAE_UNUSED_OFFICIAL_PREFIXES), ENGINE_BUFFERS.pattern)
_UNUSED = re.compile("|".join(f"(?:{p})" for p in OFFICIAL_UNUSED))
_VAE_OWNED = tuple(svd_vae_official_key(k) for k in ("decoder.", "encoder.", "quant_conv."))
_SVD_KEY = re.compile(r"model\.diffusion_model\.(input|output)_blocks\.\d+\.\d+\.time_stack\.")

# Tiny image encoder of the tests' svd-tiny model (224 pixels as the pipeline resizes to, 8 patches)
TINY_IMAGE_ENCODER = CLIPVisionConfig(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224,
    patch_size=28, hidden_act="gelu", projection_dim=16,
)  # fmt: skip


@dataclass(frozen=True)
class OfficialVariant:
    """What an official single file of this variant holds: the configs of its three modules."""

    unet: str  # a registered SVDUNetConfig
    vae: VideoVAEConfig
    image_encoder: CLIPVisionConfig


OFFICIAL_VARIANTS = {
    "svd": OfficialVariant("svd", VIDEO_VAE_CONFIGS["svd-vae"], SVD_IMAGE_ENCODER),
    "svd-xt": OfficialVariant("svd-xt", VIDEO_VAE_CONFIGS["svd-vae"], SVD_IMAGE_ENCODER),
    "svd-tiny": OfficialVariant("svd-tiny", VIDEO_VAE_CONFIGS["svd-vae-tiny"], TINY_IMAGE_ENCODER),
}


@dataclass
class SVDComponents:
    """What the SVD pipeline is built from."""

    unet: VideoUNet
    vae: VideoAutoEncoder
    image_encoder: CLIPVisionModelWithProjection
    config: SVDUNetConfig  # the UNet's (num_frames: the pipeline's default)
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    scheduler: dict  # the validated settings that change the math (SVD_SCHEDULER's keys)


def _folder_kind(path: Path) -> bool:
    """A diffusers SVD pipeline folder (or one whose unet/ is SVD's)."""
    index = folder_json(path, "model_index.json") if (path / "model_index.json").is_file() else {}
    if index.get("_class_name") == "StableVideoDiffusionPipeline":
        return True
    unet = path / "unet"
    return unet.is_dir() and folder_json(unet, "config.json").get("_class_name") == "UNetSpatioTemporalConditionModel"


def is_svd(path: str | os.PathLike) -> bool:
    """A diffusers SVD folder (model_index.json's StableVideoDiffusionPipeline, or unet/config.json's
    UNetSpatioTemporalConditionModel) or an official single file (``model.diffusion_model.*time_stack*``
    keys). Reads JSON and safetensors headers only; a path that does not exist is not SVD."""
    path = resolve_model(path)
    if path.is_dir():
        return _folder_kind(path)
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return False
    with SafetensorsFile(path) as f:
        return any(_SVD_KEY.match(k) for k in f.entries)


def official_variant(path: str | os.PathLike, variant: str | None) -> str:
    """The variant of an official single file: ``variant=``, else its file name (svd_xt* or
    *img2vid-xt* -> svd-xt, svd* or *img2vid* -> svd); the weights cannot tell them apart."""
    if variant is not None:
        if variant not in OFFICIAL_VARIANTS:
            raise InputError(f"variant={variant!r} is not an SVD variant: use one of {', '.join(OFFICIAL_VARIANTS)}")
        return variant
    name = Path(path).name.lower().replace("-", "_")
    if name.startswith("svd_xt") or "img2vid_xt" in name:  # Stability's file / hub repository names
        return "svd-xt"
    if name.startswith("svd") or "img2vid" in name:
        return "svd"
    raise AmbiguousVariantError(
        path,
        "SVD (14 frames) and SVD-XT (25 frames) have the same tensors and the file name does not say which this is",
        'pass variant="svd" or variant="svd-xt" (svd_xt*.safetensors files are SVD-XT)',
    )


def load_svd(
    path: str | os.PathLike, variant: str | None = None, device="cpu", dtype: torch.dtype = torch.float32, quant=None
) -> SVDComponents:
    """SVD's components from a diffusers folder or an official single file, validated before any
    weight is read. ``variant`` ("svd", "svd-xt"): needed for an official file whose name does not
    say; for a folder it must agree with unet/config.json's num_frames. ``quant`` as
    :func:`~.loader.load_transformer`'s, for the UNet (the VAE and image encoder load in ``dtype``)."""
    path = resolve_model(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder", "check the path")
    if path.is_dir():
        if not _folder_kind(path):
            raise CheckpointError(path, "not a Stable Video Diffusion folder (model_index.json names no "
                                  "StableVideoDiffusionPipeline, unet/config.json no UNetSpatioTemporalConditionModel)",
                                  "pass an SVD diffusers folder or an official svd*.safetensors file")  # fmt: skip
        return _load_folder(path, variant, device, dtype, quant)
    return _load_official(path, variant, device, dtype, quant)


@dataclass(frozen=True)
class _Spec:
    """What :func:`~.plan.make_plan` reads of a family spec."""

    model: type
    key_map: object


@dataclass(frozen=True)
class _Description:
    layout: Layout
    config: object
    spec: _Spec


def _unet_plan(source, layout: Layout, config, device, dtype, quant) -> LoadPlan:
    return make_plan(source, _Description(layout, config, _Spec(VideoUNet, svd_unet_from_diffusers)), dtype, device,
                     quant)  # fmt: skip


def _module_plan(source, model, plan: dict, device, dtype, owned=("",), skip=()) -> LoadPlan:
    """The load plan of ``model`` (built on meta) from ``plan`` (our key -> its file pieces), validated:
    a file tensor under the ``owned`` prefixes that the plan does not use is an error, ``skip`` aside."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    keys = tuple(k for k in source.key_file if k.startswith(owned) and k not in skip)
    validate(source, Layout("svd", None, "", keys, (), ()), plan, expected)
    return LoadPlan(model, plan, expected, dtype, device)


_FOLDER_PARTS = ("unet", "vae", "image_encoder")


def check_fits(path, unet: SVDUNetConfig, vae: VideoVAEConfig, encoder: CLIPVisionConfig) -> None:
    """The three configs describe one model: the UNet reads the VAE's latents (noise + image latent)
    and the image encoder's embedding."""
    wrong = []
    if unet.in_channels != 2 * vae.z_channels or unet.out_channels != vae.z_channels:
        wrong.append(f"the UNet's in / out channels {unet.in_channels} / {unet.out_channels} vs the VAE's "
                     f"{vae.z_channels} latent channels (in = 2 x latent, out = latent)")  # fmt: skip
    if unet.context_dim != encoder.projection_dim:
        wrong.append(f"the UNet's cross_attention_dim {unet.context_dim} vs the image encoder's projection_dim "
                     f"{encoder.projection_dim}")  # fmt: skip
    if wrong:
        raise CheckpointError(path, "the components do not fit together: " + "; ".join(wrong),
                              "the subfolders come from different models: re-download the folder")  # fmt: skip


def _load_folder(path: Path, variant, device, dtype, quant) -> SVDComponents:
    missing = [p for p in _FOLDER_PARTS if not (path / p).is_dir()]
    if missing:
        raise CheckpointError(path, f"this SVD folder has no {', '.join(p + '/' for p in missing)} (found: "
                              f"{', '.join(sorted(p.name for p in path.iterdir())[:20]) or 'nothing'})",
                              "pass a complete SVD diffusers folder (unet/, vae/, image_encoder/)")  # fmt: skip
    # every config first, then every plan (names, shapes, dtypes), and only then any weight
    config = unet_config(folder_json(path / "unet", "config.json"), path / "unet")
    if variant is not None:
        want = registry.from_name(variant) if variant in OFFICIAL_VARIANTS else None
        if want is None or want.num_frames != config.num_frames:
            raise InputError(f"variant={variant!r} does not fit this folder, whose unet/config.json says "
                             f"num_frames {config.num_frames}: leave variant= unset for a folder")  # fmt: skip
    vae_cfg = vae_config(folder_json(path / "vae", "config.json"), path / "vae")
    clip_cfg = image_encoder_config(folder_json(path / "image_encoder", "config.json"), path / "image_encoder")
    check_fits(path, config, vae_cfg, clip_cfg)
    raw = folder_json(path / "scheduler", "scheduler_config.json") if (path / "scheduler").is_dir() else {}
    scheduler = scheduler_settings(raw, path / "scheduler", SVD_SCHEDULER)
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    processor = path / "feature_extractor"
    if processor.is_dir():
        mean, std = image_processor_stats(folder_json(processor, "preprocessor_config.json"), processor, mean, std)
    with ExitStack() as stack:
        unet_src, vae_src, clip_src = (stack.enter_context(open_checkpoint(path / p)) for p in _FOLDER_PARTS)
        keys, quant_keys = split_quant_keys(list(unet_src.key_file))
        layout = Layout("svd", "diffusers", "", tuple(keys), (), (), tuple(quant_keys))
        unet_plan = _unet_plan(unet_src, layout, config, device, dtype, quant)
        with on_meta():
            model = VideoAutoEncoder(vae_cfg)
        plan = {k: svd_vae_from_diffusers(k, vae_cfg) for k in model.state_dict()}
        vae_plan = _module_plan(vae_src, model, plan, device, dtype)
        with on_meta():
            model = CLIPVisionModelWithProjection(clip_cfg)
        extra = {k for k in clip_src.key_file if k.endswith("position_ids")}  # a buffer older transformers saved
        plan = {k: [Segment(k)] for k in model.state_dict()}  # transformers' names are ours
        clip_plan = _module_plan(clip_src, model, plan, device, dtype, skip=extra)
        unet = materialize(unet_src, unet_plan)
        vae = materialize(vae_src, vae_plan)
        encoder = materialize(clip_src, clip_plan)
    return SVDComponents(unet, vae, encoder, config, mean, std, scheduler)


def _check_official_keys(source) -> None:
    """Every tensor of an official file is the UNet's, the VAE's, the image encoder's or a known
    unused group's (named in :data:`OFFICIAL_UNUSED`); anything else is refused."""
    own = (UNET_PREFIX, *_VAE_OWNED, SVD_OPENCLIP_VISUAL_PREFIX)
    unknown = [k for k in source.key_file if not k.startswith(own) and not _UNUSED.match(k)]
    if unknown:
        raise UnexpectedKeysError(source.path, unknown, "these tensors belong to no part of Stable Video "
                                  "Diffusion fastflow knows (UNet, temporal VAE, CLIP image encoder): check the "
                                  "file")  # fmt: skip


def plan_official(source, variant: str, device="cpu", dtype=torch.float32, quant=None) -> tuple[LoadPlan, ...]:
    """The validated load plans (UNet, VAE, image encoder) of an official file of ``variant``:
    every tensor named, shaped and typed as the modules need, on headers alone."""
    chosen = OFFICIAL_VARIANTS[variant]
    if not any(_SVD_KEY.match(k) for k in source.key_file):
        raise CheckpointError(source.path, "not a Stable Video Diffusion file (no model.diffusion_model.*"
                              "time_stack* tensors)", "pass an official svd*.safetensors file or an SVD diffusers "
                              "folder")  # fmt: skip
    _check_official_keys(source)
    if not any(k.startswith("first_stage_model.decoder.") and k.endswith("mix_factor") for k in source.key_file):
        raise CheckpointError(source.path, "this file's first_stage_model decoder has no temporal layers (an "
                              "*_image_decoder file, decoding frame by frame)", "use svd.safetensors / "
                              "svd_xt.safetensors (the temporal decoder), or diffusers")  # fmt: skip
    mine = [k[len(UNET_PREFIX) :] for k in source.key_file if k.startswith(UNET_PREFIX)]
    keys, quant_keys = split_quant_keys(mine)
    layout = Layout("svd", "official", UNET_PREFIX, tuple(keys), (), (), tuple(quant_keys))
    unet = _unet_plan(source, layout, registry.from_name(chosen.unet), device, dtype, quant)
    with on_meta():
        model = VideoAutoEncoder(chosen.vae)
    plan = {k: [Segment(svd_vae_official_key(k))] for k in model.state_dict()}
    vae = _module_plan(source, model, plan, device, dtype, _VAE_OWNED)
    with on_meta():
        model = CLIPVisionModelWithProjection(chosen.image_encoder)
    plan = clip_vision_openclip_plan(model.state_dict().keys())
    return unet, vae, _module_plan(source, model, plan, device, dtype, (SVD_OPENCLIP_VISUAL_PREFIX,))


def _load_official(path: Path, variant, device, dtype, quant) -> SVDComponents:
    name = official_variant(path, variant)  # before any tensor is read
    with open_checkpoint(path, "transformer") as source:
        plans = plan_official(source, name, device, dtype, quant)
        unet, vae, encoder = (materialize(source, plan) for plan in plans)
    config = unet.config
    return SVDComponents(unet, vae, encoder, config, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, dict(SVD_SCHEDULER))
