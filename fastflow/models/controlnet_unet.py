"""The SDXL ControlNet (diffusers' ``ControlNetModel``; lllyasviel's ``cldm`` names): a copy of the
UNet's encoder (input blocks and middle block, built from :mod:`.unet`'s blocks) whose input is the
latent plus the control image's embedding (``input_hint_block``: a small conv stack, SiLU between),
and a zero-initialised 1x1 conv per skip (``zero_convs``) and after the middle block
(``middle_block_out``). Its outputs are residuals the UNet adds to its skips and to its middle
block's output (:meth:`fastflow.models.unet.UNet.forward`'s ``down_residuals`` / ``mid_residual``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .configs import UNetConfig
from .unet import UNet, build_encoder
from .vae import set_groups


@dataclass(frozen=True)
class UNetControlNetConfig(UNetConfig):
    """The UNet encoder's config (its fields: the base UNet's), and the control image's embedding:
    ``conditioning_channels`` (3: an RGB map), ``embedding_channels`` (the conv stack's widths,
    diffusers' ``conditioning_embedding_out_channels``), ``bgr`` (the map's channels reversed)."""

    conditioning_channels: int = 3
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    bgr: bool = False

    family = "sdxl"


def hint_block(cfg: UNetControlNetConfig) -> nn.Sequential:
    """conv_in, then per width a conv and a stride-2 conv, then conv_out to the model width; SiLU
    after every conv but the last (cldm's ``input_hint_block`` indices: convs at even positions)."""
    widths = cfg.embedding_channels
    layers: list[nn.Module] = [nn.Conv2d(cfg.conditioning_channels, widths[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(widths[-1], cfg.model_channels, 3, padding=1))
    return nn.Sequential(*layers)


class UNetControlNet(nn.Module):
    """(down residuals [one per UNet skip], mid residual) = net(x, timesteps, context, pooled,
    time_ids, control [B, 3, H, W] in [0, 1], scale)."""

    def __init__(self, config: UNetControlNetConfig):
        super().__init__()
        self.config = cfg = config
        widths = build_encoder(self, cfg)  # the UNet's embeddings and encoder, block for block
        self.input_hint_block = hint_block(cfg)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(w, w, 1)) for w in widths)
        self.middle_block_out = nn.Sequential(nn.Conv2d(widths[-1], widths[-1], 1))
        set_groups(self, cfg.norm_groups)

    # the added embedding and the input checks are the UNet's own
    embedding = UNet.embedding
    check_inputs = UNet.check_inputs
    downscale = UNet.downscale

    @property
    def dtype(self) -> torch.dtype:
        return self.middle_block_out[0].weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        time_ids: torch.Tensor,
        control: torch.Tensor,
        scale: float = 1.0,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        if not torch.compiler.is_compiling():
            self.check_inputs(x, timesteps, context, pooled, time_ids)
            channels = self.config.conditioning_channels
            if control.ndim != 4 or tuple(control.shape[:2]) != (x.shape[0], channels):
                raise InputError(f"control must be [{x.shape[0]}, {channels}, H, W], got {list(control.shape)}")
        dtype = self.dtype
        if self.config.bgr:
            control = torch.flip(control, dims=[1])
        emb_silu = F.silu(self.embedding(timesteps, pooled, time_ids))
        context = context.to(dtype)
        hint = self.input_hint_block
        c = control.to(dtype)
        for i in range(0, len(hint) - 1, 2):
            c = F.silu(hint[i](c))
        h = self.input_blocks[0](x.to(dtype), emb_silu, context) + hint[-1](c)
        outs = [self.zero_convs[0](h)]
        for block, zero in zip(self.input_blocks[1:], self.zero_convs[1:], strict=True):
            h = block(h, emb_silu, context)
            outs.append(zero(h))
        mid = self.middle_block_out(self.middle_block(h, emb_silu, context))
        return [o * scale for o in outs], mid * scale
