"""The SDXL UNet in Stability's ``sgm`` layout (``openaimodel.py`` names: ``input_blocks``,
``middle_block``, ``output_blocks``, ``time_embed``, ``label_emb``, ``out``).

Latents [B, 4, h, w] -> predicted noise eps [B, 4, h, w] at a discrete timestep t in [0, 1000).
Math (REFERENCE.md, SDXL): ResNet blocks (GroupNorm + SiLU -> conv, + the projected embedding,
GroupNorm + SiLU -> conv, + skip), spatial transformers with linear in / out projections and
blocks of self-attention, cross-attention on the text and a GEGLU feed-forward, pre-LayerNorm
each. The embedding is the timestep's (sinusoid at ``model_channels``) plus the added
conditions': the pooled OpenCLIP-G text and the six size numbers (original size, crop top-left,
target size) each as a sinusoid of ``time_id_dim``. Hot expressions go through ``fastflow.ops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import InputError
from .configs import UNetConfig
from .layers import merge_heads, timestep_embedding
from .vae import Upsample, set_groups  # nearest 2x, then a 3x3 ``conv``: the same module in both


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return ops.groupnorm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


class ResBlock(nn.Module):
    """sgm ``ResBlock``: ``in_layers`` (norm, SiLU, conv), ``emb_layers`` (SiLU, linear),
    ``out_layers`` (norm, SiLU, dropout, conv), ``skip_connection`` (1x1 conv when widths differ)."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Conv2d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb_silu: torch.Tensor) -> torch.Tensor:
        """x [B, C, h, w]; emb_silu: SiLU of the embedding [B, E] (computed once per forward)."""
        h = self.in_layers[2](_norm_silu(self.in_layers[0], x))
        h = h + ops.linear(emb_silu, self.emb_layers[1])[:, :, None, None]
        h = self.out_layers[3](_norm_silu(self.out_layers[0], h))
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """Multi-head attention; keys and values from ``context`` (cross) or from x (self)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)  # [B, L, H*D] -> [B, H, L, D]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if context is None else context
        q, k, v = (self._heads(ops.linear(t, proj)) for t, proj in ((x, self.to_q), (kv, self.to_k), (kv, self.to_v)))
        return ops.linear(merge_heads(ops.attention(q, k, v)), self.to_out[0])


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.geglu(ops.linear(x, self.proj))  # h * GELU(gate), exact (erf) GELU, as sgm and diffusers


class FeedForward(nn.Module):
    """``net.0`` GEGLU (dim -> 2 x 4 dim), ``net.1`` dropout, ``net.2`` linear (4 dim -> dim)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(self.net[0](x), self.net[2])


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6) -> tokens -> ``proj_in`` -> blocks -> ``proj_out`` -> + input (linear
    projections: ``use_linear_in_transformer``, as every SDXL checkpoint)."""

    def __init__(self, channels: int, depth: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, channels // head_dim, head_dim, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = F.group_norm(x, self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps)
        t = ops.linear(t.permute(0, 2, 3, 1).reshape(b, h * w, c), self.proj_in)
        for block in self.transformer_blocks:
            t = block(t, context)
        t = ops.linear(t, self.proj_out)
        return x + t.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepEmbedSequential(nn.Sequential):
    """sgm's container: each layer gets what it takes (ResBlock: the embedding; transformer: the text)."""

    def forward(self, x: torch.Tensor, emb_silu: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb_silu)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def level_layers(cfg: UNetConfig, channels_in: int, level: int) -> list[nn.Module]:
    """One block of a level: a ResBlock to the level's width, then its spatial transformer if it has one."""
    width = cfg.model_channels * cfg.channel_mult[level]
    layers = [ResBlock(channels_in, cfg.time_embed_dim, width)]
    if cfg.transformer_depth[level]:
        layers.append(SpatialTransformer(width, cfg.transformer_depth[level], cfg.head_dim, cfg.context_dim))
    return layers


def build_encoder(module: nn.Module, cfg: UNetConfig) -> list[int]:
    """The UNet's embeddings, input blocks and middle block as attributes of ``module`` (sgm's names):
    :class:`UNet` and the SDXL ControlNet build theirs so. Returns the widths of the input blocks'
    outputs (the decoder's skips, the ControlNet's zero convs)."""
    mc, emb = cfg.model_channels, cfg.time_embed_dim
    module.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
    module.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb)))
    module.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    skips, ch = [mc], mc
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            module.input_blocks.append(TimestepEmbedSequential(*level_layers(cfg, ch, level)))
            ch = mc * mult
            skips.append(ch)
        if level != len(cfg.channel_mult) - 1:
            module.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skips.append(ch)
    module.middle_block = TimestepEmbedSequential(
        ResBlock(ch, emb, ch),
        SpatialTransformer(ch, cfg.transformer_depth_middle, cfg.head_dim, cfg.context_dim),
        ResBlock(ch, emb, ch),
    )
    return skips


class UNet(nn.Module):
    """eps = UNet(x [B, 4, h, w], timesteps [B], context [B, L, 2048], pooled [B, 1280], time_ids [B, 6])."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        skips = build_encoder(self, cfg)
        ch = skips[-1]
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = level_layers(cfg, ch + skips.pop(), level)
                ch = cfg.model_channels * cfg.channel_mult[level]
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        set_groups(self, cfg.norm_groups)

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].weight.dtype

    @property
    def num_blocks(self) -> int:
        """Entries of input_blocks, middle_block and output_blocks (what ``out.stats`` counts)."""
        return len(self.input_blocks) + 1 + len(self.output_blocks)

    @property
    def downscale(self) -> int:
        """Latent sides must be multiples of this (one halving per level below the first)."""
        return 2 ** (len(self.config.channel_mult) - 1)

    def embedding(self, timesteps: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """The ResBlocks' embedding [B, E]: time_embed(sinusoid(t)) + label_emb([pooled, sinusoids of
        the six time ids]). Sinusoids in fp32, then the model's dtype (as diffusers)."""
        cfg, dtype = self.config, self.dtype
        t_emb = timestep_embedding(timesteps.float(), cfg.model_channels).to(dtype)
        ids = timestep_embedding(time_ids.to(dtype).float().flatten(), cfg.time_id_dim).reshape(len(time_ids), -1)
        y = torch.cat((pooled.to(dtype), ids.to(dtype)), dim=-1)
        mlp, label = self.time_embed, self.label_emb[0]
        time = ops.linear(F.silu(ops.linear(t_emb, mlp[0])), mlp[2])
        return time + ops.linear(F.silu(ops.linear(y, label[0])), label[2])

    def check_inputs(self, x, timesteps, context, pooled, time_ids) -> None:
        cfg, f = self.config, self.downscale
        b = x.shape[0] if x.ndim == 4 else None
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[-2] % f or x.shape[-1] % f:
            raise InputError(
                f"latents must be [B, {cfg.in_channels}, h, w] with h, w multiples of {f}, got {list(x.shape)}"
            )
        expected = {
            "timesteps": (timesteps, (b,)),
            "pooled": (pooled, (b, cfg.pooled_dim)),
            "time_ids": (time_ids, (b, 6)),
        }
        for name, (t, shape) in expected.items():
            if tuple(t.shape) != shape:
                raise InputError(f"{name} must be {list(shape)}, got {list(t.shape)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.context_dim:
            raise InputError(f"context must be [{b}, L, {cfg.context_dim}], got {list(context.shape)}")

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        time_ids: torch.Tensor,
        down_residuals: list[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
        deep_cache=None,
    ) -> torch.Tensor:
        """``down_residuals`` / ``mid_residual``: a ControlNet's, added to each skip (one per input
        block) and to the middle block's output, as diffusers' UNet2DConditionModel does.
        ``deep_cache``: DeepCache's plan (fastflow.caching.deepcache.DeepFeature: ``branch``,
        ``feature``): with a feature, only the shallow path runs from it; without, the whole UNet
        runs and the feature entering the decoder at the branch is stored on it."""
        if not torch.compiler.is_compiling():
            self.check_inputs(x, timesteps, context, pooled, time_ids)
        dtype = self.dtype
        emb_silu = F.silu(self.embedding(timesteps, pooled, time_ids))
        context = context.to(dtype)
        h, skips = x.to(dtype), []
        shallow, first, keep = deep_range(self, deep_cache)
        for i, block in enumerate(self.input_blocks[: len(self.input_blocks) - first]):
            h = block(h, emb_silu, context)
            skips.append(h if down_residuals is None else h + down_residuals[i])
        if shallow:
            h = deep_cache.feature
        else:
            h = self.middle_block(h, emb_silu, context)
            if mid_residual is not None:
                h = h + mid_residual
        for j, block in enumerate(self.output_blocks[first:], first):
            if j == keep:
                deep_cache.feature = h
            h = block(torch.cat((h, skips.pop()), dim=1), emb_silu, context)
        return self.out[2](_norm_silu(self.out[0], h))


def deep_range(model, deep_cache) -> tuple[bool, int, int]:
    """(shallow, first output block to run, output block whose input to keep; -1: none) under
    DeepCache's plan: a shallow pass skips the middle block, the deep input blocks and the output
    blocks before the branch's partner ``len(output_blocks) - 1 - branch``; a full pass keeps the
    partner's input (the feature that meets skip ``branch``)."""
    if deep_cache is None:
        return False, 0, -1
    partner = len(model.output_blocks) - 1 - deep_cache.branch
    return (True, partner, -1) if deep_cache.feature is not None else (False, 0, partner)
