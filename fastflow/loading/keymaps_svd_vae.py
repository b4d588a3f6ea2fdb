"""Key maps of SVD's temporal-decoder VAE (``models/vae_video.py``, sgm names).

``svd_vae_from_diffusers``: the diffusers AutoencoderKLTemporalDecoder source of each of our
tensors. ``svd_vae_official_key``: where an official single file (svd.safetensors, svd_xt*.safetensors)
holds it. sgm decodes with ``first_stage_model.decoder`` but encodes the conditioning frame with
``conditioner.embedders.3.encoder`` (encoder + quant_conv; ``first_stage_model`` has no quant_conv
and its encoder is unused at inference), so the official loader reads two prefixes; the leftovers
in ``SVD_VAE_UNUSED_OFFICIAL_PREFIXES`` are known and unused.

diffusers' mid block has ``layers_per_block`` ResNets and applies its attention only between the
first two; sgm's mid is always block_1 / attn_1 / block_2, so only diffusers folders with
layers_per_block == 2 (all SVD releases) correspond; others miss or add mid-block tensors.
"""

from __future__ import annotations

import re

from .keymaps import Segment, vae_from_diffusers

SVD_VAE_DECODER_PREFIX = "first_stage_model."
SVD_VAE_ENCODER_PREFIX = "conditioner.embedders.3.encoder."
SVD_VAE_UNUSED_OFFICIAL_PREFIXES = (
    "first_stage_model.encoder.",
    "conditioner.embedders.3.encoder.decoder.",
    "conditioner.embedders.3.encoder.post_quant_conv.",
)

_TIME_STACK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
}


def svd_vae_official_key(key: str) -> str:
    """The name in an official SVD single file of one of our tensors."""
    if key.startswith("decoder."):
        return SVD_VAE_DECODER_PREFIX + key
    if key.startswith(("encoder.", "quant_conv.")):
        return SVD_VAE_ENCODER_PREFIX + key
    raise KeyError(f"not a tensor of the SVD VAE: {key!r}")


def _resnet(base: str, tail: str) -> str:
    """A VideoResnetBlock part -> its SpatioTemporalResBlock name under ``base``."""
    if tail == "mix_factor":
        return f"{base}.time_mixer.mix_factor"
    if m := re.fullmatch(r"time_stack\.(in_layers\.[02]|out_layers\.[03])\.(weight|bias)", tail):
        return f"{base}.temporal_res_block.{_TIME_STACK[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)", tail):
        return f"{base}.spatial_res_block.{m[1].replace('nin_shortcut', 'conv_shortcut')}.{m[2]}"
    raise KeyError(f"no diffusers source known for SVD VAE ResNet tensor {tail!r}")


def svd_vae_from_diffusers(key: str, config) -> list[Segment]:
    """Sources, in diffusers AutoencoderKLTemporalDecoder names, of one of our (sgm) tensors."""
    if not key.startswith("decoder."):  # encoder.* and quant_conv.*: the SD VAE's names
        return vae_from_diffusers(key, config)
    rest = key[len("decoder.") :]
    top = len(config.ch_mult) - 1
    if rest.startswith(("conv_in.", "mid.attn_1.")):
        return vae_from_diffusers(key, config)
    if m := re.fullmatch(r"conv_out\.time_mix_conv\.(weight|bias)", rest):
        return [Segment(f"decoder.time_conv_out.{m[1]}")]
    if m := re.fullmatch(r"conv_out\.(weight|bias)", rest):
        return [Segment(key)]
    if m := re.fullmatch(r"norm_out\.(weight|bias)", rest):
        return [Segment(f"decoder.conv_norm_out.{m[1]}")]
    if m := re.fullmatch(r"mid\.block_([12])\.(.+)", rest):
        return [Segment(_resnet(f"decoder.mid_block.resnets.{int(m[1]) - 1}", m[2]))]
    if m := re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(.+)", rest):  # up blocks are numbered in reverse
        return [Segment(_resnet(f"decoder.up_blocks.{top - int(m[1])}.resnets.{m[2]}", m[3]))]
    if m := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(weight|bias)", rest):
        return [Segment(f"decoder.up_blocks.{top - int(m[1])}.upsamplers.0.conv.{m[2]}")]
    raise KeyError(f"no diffusers source known for SVD VAE tensor {key!r}")
