"""The SD3 / SD3.5 ControlNet (diffusers' ``SD3ControlNetModel``, InstantX layout): the MMDiT's
embedders and position table, ``depth`` joint blocks built from :mod:`.mmdit`'s (none pre-only: each
keeps its text stream), ``pos_embed_input`` (a zero-initialised patch embedding of the control
latents, added to the image tokens) and one zero-initialised linear per block (``controlnet_blocks``)
whose outputs are the residuals the MMDiT adds after its blocks (:meth:`.mmdit.MMDiT.blocks`).
Parameter names: the MMDiT's official (SAI) ones, diffusers' for the ControlNet's own layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..errors import InputError
from .configs import MMDiTConfig
from .mmdit import MMDiT, PatchEmbed, build_trunk


@dataclass(frozen=True)
class MMDiTControlNetConfig(MMDiTConfig):
    """The MMDiT fields (``depth``: the ControlNet's own blocks) and its control input:
    ``extra_conditioning_channels`` (beyond the latent's, e.g. an inpainting mask), and
    ``force_zeros_for_pooled_projection`` (the pipeline hands it zeros for the pooled text)."""

    extra_conditioning_channels: int = 0
    force_zeros_for_pooled_projection: bool = True

    family = "sd3"


class MMDiTControlNet(nn.Module):
    """residuals [depth x [B, h_p*w_p, C]] = net(x, timesteps, context, y, control latents, scale)."""

    def __init__(self, config: MMDiTControlNetConfig):
        super().__init__()
        self.config = c = config
        build_trunk(self, c, pre_only=False)  # the MMDiT's embedders, position table and blocks
        self.controlnet_blocks = nn.ModuleList(nn.Linear(c.hidden_size, c.hidden_size) for _ in range(c.depth))
        self.pos_embed_input = PatchEmbed(c.patch_size, c.in_channels + c.extra_conditioning_channels, c.hidden_size)

    # the embedders, the position table's crop and the size checks are the MMDiT's own
    check_size = MMDiT.check_size
    cropped_pos_embed = MMDiT.cropped_pos_embed
    conditioning = MMDiT.conditioning

    @property
    def dtype(self) -> torch.dtype:
        return self.context_embedder.bias.dtype

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor,
        control: torch.Tensor,
        scale: float = 1.0,
    ) -> list[torch.Tensor]:
        """x [B, 16, h, w] (the MMDiT's input); timesteps [B] = sigma * 1000; context [B, L, C_text];
        y [B, 2048] (zeros where the config forces them); control [B, 16 + extra, h, w] latents."""
        cfg = self.config
        want = cfg.in_channels + cfg.extra_conditioning_channels
        if x.ndim != 4 or control.ndim != 4 or control.shape[0] != x.shape[0] or control.shape[1] != want:
            raise InputError(f"control latents must be [{x.shape[0]}, {want}, h, w], got {list(control.shape)}")
        if control.shape[-2:] != x.shape[-2:]:
            raise InputError(
                f"control latents {list(control.shape[-2:])} differ from the latents' {list(x.shape[-2:])}"
            )
        h, w = x.shape[-2:]
        self.check_size(h, w)
        p, dtype = cfg.patch_size, self.dtype
        h_p, w_p = h // p, w // p
        hidden = self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(h_p, w_p).to(dtype)
        hidden = hidden + self.pos_embed_input(control.to(dtype))
        c = self.conditioning(timesteps, y)
        ctx = self.context_embedder(context.to(dtype))
        outs = []
        for block, out in zip(self.joint_blocks, self.controlnet_blocks, strict=True):
            ctx, hidden = block(ctx, hidden, c)
            outs.append(ops.linear(hidden, out))
        return [o * scale for o in outs]
