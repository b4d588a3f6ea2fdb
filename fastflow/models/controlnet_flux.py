"""The FLUX.1 ControlNet (diffusers' ``FluxControlNetModel``: InstantX / Shakker-Labs / union
layouts): the transformer's embedders and RoPE, ``depth`` double and ``depth_single_blocks``
single blocks built from :mod:`.flux`'s, ``controlnet_x_embedder`` (a zero-initialised linear of
the packed control latents, added to the image tokens), ``controlnet_mode_embedder`` for union
models (the control mode's embedding prepended to the text tokens, its position id a copy of the
first text id), and one zero-initialised linear per block (``controlnet_blocks`` /
``controlnet_single_blocks``) whose outputs of the image tokens are the residuals
:meth:`.flux.Flux.blocks` adds. Parameter names: the transformer's official (BFL) ones,
diffusers' for the ControlNet's own layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..errors import InputError
from .configs import FluxConfig
from .flux import Flux, build_trunk
from .layers import batch_shared_ids


@dataclass(frozen=True)
class FluxControlNetConfig(FluxConfig):
    """The FLUX fields (``depth`` / ``depth_single_blocks``: the ControlNet's own blocks) and
    ``num_mode``: the control modes of a union ControlNet (None: not a union model)."""

    num_mode: int | None = None

    family = "flux"


class FluxControlNet(nn.Module):
    """(double, single) residuals = net(img, txt, y, timesteps, img_ids, txt_ids, guidance, control, mode, scale)."""

    def __init__(self, config: FluxControlNetConfig):
        super().__init__()
        self.config = c = config
        build_trunk(self, c)  # the transformer's embedders and blocks
        self.controlnet_blocks = nn.ModuleList(nn.Linear(c.hidden_size, c.hidden_size) for _ in range(c.depth))
        self.controlnet_single_blocks = nn.ModuleList(
            nn.Linear(c.hidden_size, c.hidden_size) for _ in range(c.depth_single_blocks)
        )
        self.controlnet_x_embedder = nn.Linear(c.in_channels, c.hidden_size)
        if c.num_mode is not None:
            self.controlnet_mode_embedder = nn.Embedding(c.num_mode, c.hidden_size)

    # the timestep / guidance / pooled-text conditioning is the transformer's own
    conditioning = Flux.conditioning

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.bias.dtype

    @property
    def union(self) -> bool:
        return self.config.num_mode is not None

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        y: torch.Tensor,
        timesteps: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None,
        control: torch.Tensor,
        mode: int | None = None,
        scale: float = 1.0,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """img [B, N, 64] packed latents; txt [B, T, C_text]; y [B, vec_in]; timesteps [B] sigma;
        img_ids [N, 3]; txt_ids [T, 3]; guidance [B] (guidance-embedded nets); control [B, N, 64]
        packed control latents; mode: the union model's control mode. Returns the residuals of the
        image tokens after each double and each single block, [B, N, C] each, times ``scale``."""
        cfg, dtype = self.config, self.dtype
        if control.shape != img.shape:
            raise InputError(f"control latents must be {list(img.shape)} (packed like the latents), got "
                             f"{list(control.shape)}")  # fmt: skip
        if self.union and mode is None:
            raise InputError(f"this union ControlNet needs control_mode= (0 .. {cfg.num_mode - 1})")
        hidden = self.img_in(img.to(dtype)) + ops.linear(control.to(dtype), self.controlnet_x_embedder)
        vec = self.conditioning(timesteps, y, guidance)
        ctx = self.txt_in(txt.to(dtype))
        img_ids = batch_shared_ids(img_ids, 3, "img_ids")
        txt_ids = batch_shared_ids(txt_ids, 3, "txt_ids").to(img_ids.dtype)
        if self.union:
            modes = torch.full((ctx.shape[0], 1), int(mode), dtype=torch.long, device=ctx.device)
            ctx = torch.cat((self.controlnet_mode_embedder(modes).to(dtype), ctx), dim=1)
            txt_ids = torch.cat((txt_ids[:1], txt_ids), dim=0)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=0))
        n_txt = ctx.shape[1]
        doubles, singles = [], []
        for block, out in zip(self.double_blocks, self.controlnet_blocks, strict=True):
            hidden, ctx = block(hidden, ctx, vec, pe)
            doubles.append(ops.linear(hidden, out) * scale)
        x = torch.cat((ctx, hidden), dim=1)
        for block, out in zip(self.single_blocks, self.controlnet_single_blocks, strict=True):
            x = block(x, vec, pe)
            singles.append(ops.linear(x[:, n_txt:], out) * scale)
        return doubles, singles
