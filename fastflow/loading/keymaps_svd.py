"""Key maps of Stable Video Diffusion (issue 36): diffusers folder names -> our (official, sgm) names.

The UNet's map is the SDXL UNet's (:func:`.keymaps.unet_from_diffusers`: same skeleton, same
block numbering) with the temporal parts renamed: a ResNet block's spatial half is diffusers'
``resnets.j.spatial_res_block``, its ``time_stack`` the ``temporal_res_block`` (same part names),
its ``time_mixer`` the resnet's; a transformer's ``time_stack.N`` is
``temporal_transformer_blocks.N`` and ``time_pos_embed.{0,2}`` ``time_pos_embed.linear_{1,2}``.
No tensor is reshaped or fused. The VAE's and the image encoder's maps go in their own modules.
"""

from __future__ import annotations

import re

from .keymaps import _RESNET_PARTS, Segment, unet_from_diffusers

_RESNET = re.compile(r"(input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.0)\.(time_stack\.)?(.+)")
_TRANSFORMER = re.compile(r"(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\.(.+)")
_TIME_POS = {"time_pos_embed.0": "time_pos_embed.linear_1", "time_pos_embed.2": "time_pos_embed.linear_2"}


def _resnet_prefix(block: str, config) -> str:
    """diffusers' ``...resnets.j`` of the ResNet block at official ``block`` (e.g. input_blocks.1.0)."""
    (seg,) = unet_from_diffusers(f"{block}.in_layers.0.weight", config)
    return seg.key.removesuffix(".norm1.weight")


def svd_unet_from_diffusers(key: str, config) -> list[Segment]:
    """Sources, in diffusers UNetSpatioTemporalConditionModel names, of one official (sgm) SVD UNet
    tensor (``model.diffusion_model.`` stripped); ``config``: an :class:`SVDUNetConfig`."""
    m = _RESNET.fullmatch(key)
    if m and (m[2] or m[3] == "time_mixer.mix_factor" or m[3].rpartition(".")[0] in _RESNET_PARTS):
        block, temporal, rest = m[1], m[2], m[3]
        if rest == "time_mixer.mix_factor" and not temporal:
            return [Segment(f"{_resnet_prefix(block, config)}.time_mixer.mix_factor")]
        (seg,) = unet_from_diffusers(f"{block}.{rest}", config)
        prefix = _resnet_prefix(block, config)
        part = "temporal_res_block" if temporal else "spatial_res_block"
        return [Segment(f"{prefix}.{part}.{seg.key.removeprefix(prefix + '.')}")]
    if m := _TRANSFORMER.fullmatch(key):
        block, rest = m[1], m[2]
        name, _, param = rest.rpartition(".")
        if name in _TIME_POS:
            rest = f"{_TIME_POS[name]}.{param}"
        elif rest.startswith("time_stack."):
            rest = "temporal_transformer_blocks." + rest.removeprefix("time_stack.")
        return unet_from_diffusers(f"{block}.{rest}", config)
    return unet_from_diffusers(key, config)
