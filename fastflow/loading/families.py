"""What loading knows per model family, in one table: a new family adds a :class:`FamilySpec` (its
module, how its keys look, how its shapes give the architecture, its diffusers key map and
config.json reader), not a branch in every stage.

The stages read it: :mod:`.describe` names the family from the key names (:func:`identify`) and
reads the architecture and config; :mod:`.plan` builds the module and maps its keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..models import configs as registry
from ..models.flux import Flux
from ..models.mmdit import MMDiT
from ..models.unet import UNet
from ..models.vae import AutoEncoder
from . import described, probes
from .keymaps import Segment, flux_from_diffusers, sd3_from_diffusers, unet_from_diffusers, vae_from_diffusers


@dataclass(frozen=True)
class FamilySpec:
    title: str  # what messages call a checkpoint of this family
    component: str  # the pipeline component it is: "transformer" or "vae"
    model: type  # the module built from the config
    signatures: dict[str, tuple[str, ...]]  # naming -> key patterns that all occur (first match wins)
    arch: Callable  # (source, layout) -> the config's arch() tuple, from tensor shapes
    arch_fields: tuple[str, ...]  # the names of that tuple's entries, for messages
    key_map: Callable[..., list[Segment]]  # (official key, config) -> its diffusers sources
    mismatch_hint: str  # what to do with a checkpoint of this family passed as another
    config_class: type | None = None  # what config={...} fields build (None: config= cannot describe it)
    from_folder: Callable | None = None  # (source, name) -> the config a diffusers config.json describes
    refine: Callable | None = None  # (cfg, source) -> cfg with what a folder's config.json adds


# Detection order matters: FLUX's diffusers names hold transformer_blocks too, checked before SD3's.
FAMILIES: dict[str, FamilySpec] = {
    "flux": FamilySpec(
        title="a FLUX.1 transformer",
        component="transformer",
        model=Flux,
        signatures={
            "official": (r"(double|single)_blocks\.\d+\.",),
            "diffusers": (r"single_transformer_blocks\.\d+\.",),
        },
        arch=probes.flux_arch,
        arch_fields=probes.FLUX_FIELDS,
        key_map=flux_from_diffusers,
        mismatch_hint="load it as a FLUX.1 model (leave family= unset to detect it)",
        config_class=registry.FluxConfig,
        from_folder=described.flux_from_folder,
        refine=described.flow_refined,
    ),
    "sd3": FamilySpec(
        title="an SD3/SD3.5 MMDiT transformer",
        component="transformer",
        model=MMDiT,
        signatures={
            "official": (r"joint_blocks\.\d+\.",),
            "diffusers": (r"transformer_blocks\.\d+\.", r"pos_embed\.proj\."),
        },
        arch=probes.sd3_arch,
        arch_fields=probes.SD3_FIELDS,
        key_map=sd3_from_diffusers,
        mismatch_hint="load it as an SD3/SD3.5 model (leave family= unset to detect it)",
        config_class=registry.MMDiTConfig,
        from_folder=described.mmdit_from_folder,
        refine=described.flow_refined,
    ),
    "sdxl": FamilySpec(
        title="an SDXL UNet",
        component="transformer",
        model=UNet,
        signatures={
            "official": (r"input_blocks\.\d+\.", r"label_emb\.0\."),
            "diffusers": (r"down_blocks\.\d+\.", r"add_embedding\."),
        },
        arch=probes.unet_arch,
        arch_fields=probes.UNET_FIELDS,
        key_map=unet_from_diffusers,
        mismatch_hint="load it as an SDXL model: fastflow.load(path) detects it (leave family= unset)",
        config_class=registry.UNetConfig,
        from_folder=described.unet_from_folder,
        refine=described.unet_refined,
    ),
    "vae": FamilySpec(
        title="a VAE (autoencoder)",
        component="vae",
        model=AutoEncoder,
        signatures={
            "diffusers": (
                r"(first_stage_model\.|vae\.)?(decoder|encoder)\.conv_in\.",
                r"(first_stage_model\.|vae\.)?(de|en)coder\.(up|down)_blocks\.",
            ),
            "official": (r"(first_stage_model\.|vae\.)?(decoder|encoder)\.conv_in\.",),
        },
        arch=probes.vae_arch,
        arch_fields=probes.VAE_FIELDS,
        key_map=vae_from_diffusers,
        mismatch_hint="pass it as the VAE (vae=...), not as the transformer",
        from_folder=described.vae_from_folder,
        refine=described.vae_refined,
    ),
}

# Stable Video Diffusion (issue 36, loading/svd.py): its UNet also shows SDXL's signatures and its
# temporal-decoder VAE the VAE's, so these are checked first. The temporal parts name them: sgm's
# ``time_stack`` / ``time_mixer.mix_factor`` / ``time_mix_conv``, diffusers' ``spatial_res_block`` /
# ``temporal_transformer_blocks`` / ``time_conv_out``.
VIDEO_SIGNATURES = {
    "svd": {
        "official": (r"(input_blocks|middle_block|output_blocks)\.\d+\.(\d+\.)?(time_stack\.|time_mixer\.mix_factor)",),
        "diffusers": (r"(down|up)_blocks\.\d+\.(resnets\.\d+\.(spatial|temporal)_res_block\.|attentions\.\d+\."
                      r"temporal_transformer_blocks\.)",),
    },
    "svd-vae": {
        "official": (r"(first_stage_model\.)?decoder\.(mid\.block_1\.mix_factor|conv_out\.time_mix_conv\.)",),
        "diffusers": (r"(vae\.)?decoder\.time_conv_out\.",),
    },
}  # fmt: skip
SVD_HINT = "load Stable Video Diffusion with fastflow.load(path) (a video pipeline) or fastflow.loading.load_svd"

# What detection may find besides the families above (refused by the loaders, named in messages).
_TEXT_ENCODER = r"(text_encoders?\.\w*\.?)?(transformer\.)?(text_model\.|encoder\.block\.|shared\.weight)"
FAMILY_NAMES = {
    **{family: spec.title for family, spec in FAMILIES.items()},
    "svd": "a Stable Video Diffusion UNet",
    "svd-vae": "a Stable Video Diffusion temporal-decoder VAE",
    "text_encoder": "a text encoder (CLIP or T5)",
    "unknown": "no model fastflow knows",
}
MISMATCH_HINTS = {
    **{family: spec.mismatch_hint for family, spec in FAMILIES.items()},
    "text_encoder": "pass it as a text encoder, not as the transformer",
    "svd": SVD_HINT,
    "svd-vae": SVD_HINT,
}


def families_of(component: str) -> list[str]:
    """The families a pipeline component can be, in detection order."""
    return [family for family, spec in FAMILIES.items() if spec.component == component]


def identify(keys) -> tuple[str, str | None]:
    """(family, naming) that a component's keys show: "text_encoder" / "unknown" with no naming
    for what no family's signature matches."""

    def has(pattern: str) -> bool:
        return any(re.match(pattern, k) for k in keys)

    for family, signatures in VIDEO_SIGNATURES.items():
        for naming, patterns in signatures.items():
            if all(has(p) for p in patterns):
                return family, naming
    for family, spec in FAMILIES.items():
        for naming, patterns in spec.signatures.items():
            if all(has(p) for p in patterns):
                return family, naming
    if has(_TEXT_ENCODER):
        return "text_encoder", None
    return "unknown", None


def describe_arch(arch: tuple, family: str) -> str:
    return ", ".join(f"{f}={v}" for f, v in zip(FAMILIES[family].arch_fields, arch, strict=True))
