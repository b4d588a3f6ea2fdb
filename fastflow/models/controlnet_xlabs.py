"""The XLabs FLUX.1 ControlNet (x-flux's ``ControlNetFlux``; diffusers' ``FluxControlNetModel`` with
``conditioning_embedding_channels``): :class:`~.controlnet_flux.FluxControlNet`'s embedders and
double blocks (x-flux: 2, no single blocks), whose control input is the control image itself in
[-1, 1], not its latents: ``input_hint_block`` (8 convs at even indices, SiLU between; three of
them stride 2: 1/8 of the image size) makes ``hint_channels`` maps that are packed 2x2 like the
latents and added to the image tokens through ``controlnet_x_embedder`` (x-flux's
``pos_embed_input``). Its double-block residuals are repeated over the base model's double
blocks, block i taking residual ``i % depth``, as x-flux's ``Flux.forward`` (and diffusers'
``controlnet_blocks_repeat``) add them; the single blocks get none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .controlnet_flux import FluxControlNet, FluxControlNetConfig
from .flux import pack_latents


@dataclass(frozen=True)
class XLabsControlNetConfig(FluxControlNetConfig):
    """The FLUX fields, ``hint_channels`` (the conv stack's output, 16 in every XLabs net: packed
    2x2 they are the 64 latent channels) and ``base_depth``: the base model's double blocks, over
    which the residuals are repeated."""

    hint_channels: int = 16
    base_depth: int = 19


def hint_block(cfg: XLabsControlNetConfig) -> nn.Sequential:
    """x-flux's input_hint_block: 3 -> 16, then three (3x3, stride-2 3x3) pairs of 16, then conv_out."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1), nn.SiLU()]
    for _ in range(3):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(16, cfg.hint_channels, 3, padding=1))
    return nn.Sequential(*layers)


class XLabsFluxControlNet(FluxControlNet):
    """(double residuals [base_depth x [B, N, C]], []) = net(img, txt, y, timesteps, img_ids, txt_ids,
    guidance, control image [B, 3, 16 h, 16 w] in [-1, 1], mode (None), scale)."""

    pixel_control = True  # the pipeline hands the control image, not its latents

    def __init__(self, config: XLabsControlNetConfig):
        super().__init__(config)
        self.input_hint_block = hint_block(config)

    def forward(self, img, txt, y, timesteps, img_ids, txt_ids, guidance, control, mode=None, scale=1.0):
        b, n = img.shape[:2]
        if control.ndim != 4 or control.shape[:2] != (b, 3) or control.shape[2] % 16 or control.shape[3] % 16:
            raise InputError(f"the control image must be [{b}, 3, H, W] with H, W multiples of 16, got "
                             f"{list(control.shape)}")  # fmt: skip
        if (control.shape[2] // 16) * (control.shape[3] // 16) != n:
            raise InputError(f"the control image {list(control.shape[2:])} does not cover the {n} latent tokens")
        if mode is not None:
            raise InputError("an XLabs ControlNet has no control modes: leave control_mode unset")
        hint = self.input_hint_block
        c = control.to(self.dtype)
        for i in range(0, len(hint) - 1, 2):
            c = F.silu(hint[i](c))
        packed = pack_latents(hint[-1](c))
        doubles, _ = super().forward(img, txt, y, timesteps, img_ids, txt_ids, guidance, packed, None, scale)
        return [doubles[i % len(doubles)] for i in range(self.config.base_depth)], []


def flux_controlnet(config: FluxControlNetConfig) -> nn.Module:
    """The module of a FLUX ControlNet config: XLabs' for an XLabs config, else InstantX's."""
    return (XLabsFluxControlNet if isinstance(config, XLabsControlNetConfig) else FluxControlNet)(config)


__all__ = ["XLabsControlNetConfig", "XLabsFluxControlNet", "flux_controlnet", "hint_block"]
