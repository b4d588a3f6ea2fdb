"""The Stable Video Diffusion UNet in Stability's ``sgm`` layout (``VideoUNet``: ``input_blocks``,
``middle_block``, ``output_blocks``, ``time_embed``, ``label_emb``, ``out``; per block the temporal
parts ``time_stack``, ``time_mixer.mix_factor``, ``time_pos_embed``).

Noisy latents and the conditioning image's latents [B, F, 8, h, w] -> the model output
[B, F, 4, h, w], with the math of diffusers' ``UNetSpatioTemporalConditionModel``: the SDXL
UNet's skeleton (:mod:`.unet`'s blocks) run on the frames folded into the batch (frame-minor,
sgm's ``(b t)``), each ResNet block followed by a temporal ResNet block (convolutions of kernel
[3, 1, 1] over the frames) and each spatial transformer by a temporal one (attention over the
frames at each position, a sinusoidal frame embedding, the first frame's context); the spatial
and temporal results are mixed by a learned ``alpha = sigmoid(mix_factor)``:
``alpha * spatial + (1 - alpha) * temporal`` (AlphaBlender ``learned_with_images`` with no
image-only frames, as diffusers' UNet always runs it). The embedding adds the three time ids
(fps - 1, motion bucket, noise augmentation) as sinusoids through ``label_emb``. Cross-attention
on a one-token context (SVD's CLIP image embedding) is ``to_out(to_v(context))`` exactly (softmax
over one key is 1): :class:`ImageCrossAttention` skips the query / key projections and attention.

GroupNorm eps as diffusers' (the parity reference; sgm uses 1e-5 throughout): 1e-6 in the ResNet
blocks (spatial and temporal) of levels with attention on the way down and of every level on the
way up, 1e-5 in the other down levels and the middle block; 1e-6 in the transformers, 1e-5 in
``out``. Hot expressions go through ``fastflow.ops`` as in :mod:`.unet`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import InputError
from .configs_svd import SVDUNetConfig
from .layers import timestep_embedding
from .unet import CrossAttention, Downsample, FeedForward, ResBlock, SpatialTransformer, deep_range
from .vae import Upsample

EPS_ATTENTION_LEVELS = 1e-6  # diffusers' CrossAttn*BlockSpatioTemporal and every up block
EPS_PLAIN = 1e-5  # diffusers' DownBlockSpatioTemporal and UNetMidBlockSpatioTemporal


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """SiLU(GroupNorm(x)) for x [N, C, ...] of any rank (trailing dims flattened: same statistics)."""
    y = ops.groupnorm_silu(x.flatten(3) if x.ndim > 4 else x, norm.weight, norm.bias, norm.num_groups, norm.eps)
    return y.view_as(x)


class AlphaBlender(nn.Module):
    """sgm / diffusers ``AlphaBlender`` (``learned_with_images``, no image-only frames):
    ``alpha * x_spatial + (1 - alpha) * x_temporal`` with ``alpha = sigmoid(mix_factor)``."""

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([alpha]))

    def forward(self, x_spatial: torch.Tensor, x_temporal: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.mix_factor).to(x_spatial.dtype)
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


class TemporalResBlock(nn.Module):
    """sgm ``time_stack`` of a ``VideoResBlock`` (diffusers ``TemporalResnetBlock``): the ResBlock's
    layout with [3, 1, 1] convolutions over the frames (zero-padded at the first and last frame),
    no skip projection (same width in and out)."""

    def __init__(self, channels: int, emb_dim: int, eps: float):
        super().__init__()

        def conv():
            return nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels, eps=eps), nn.SiLU(), conv())
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, channels, eps=eps), nn.SiLU(), nn.Dropout(0.0), conv())

    def forward(self, x: torch.Tensor, emb_silu: torch.Tensor) -> torch.Tensor:
        """x [B, C, F, h, w]; emb_silu [B * F, E] (frame-minor)."""
        b, c, frames = x.shape[:3]
        h = self.in_layers[2](_norm_silu(self.in_layers[0], x))
        emb = ops.linear(emb_silu, self.emb_layers[1]).view(b, frames, c)
        h = h + emb.transpose(1, 2)[..., None, None]
        h = self.out_layers[3](_norm_silu(self.out_layers[0], h))
        return x + h


class VideoResBlock(ResBlock):
    """sgm ``VideoResBlock`` (diffusers ``SpatioTemporalResBlock``): the SDXL ResBlock on each
    frame, then ``time_stack`` across the frames, mixed by ``time_mixer``."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, eps: float):
        super().__init__(channels, emb_dim, out_channels)
        self.in_layers[0].eps = self.out_layers[0].eps = eps
        self.time_stack = TemporalResBlock(out_channels, emb_dim, eps)
        self.time_mixer = AlphaBlender()

    def forward(self, x: torch.Tensor, emb_silu: torch.Tensor, frames: int) -> torch.Tensor:
        """x [B * F, C, h, w] -> [B * F, C', h, w]."""
        h = super().forward(x, emb_silu)
        bf, c, hh, ww = h.shape
        spatial = h.view(bf // frames, frames, c, hh, ww).transpose(1, 2)  # [B, C, F, h, w]
        temporal = self.time_stack(spatial.contiguous(), emb_silu)
        return self.time_mixer(spatial, temporal).transpose(1, 2).reshape(bf, c, hh, ww)


class ImageCrossAttention(CrossAttention):
    """Cross-attention on the image embedding. With one context token softmax is exactly 1, so
    every query's output is ``to_out(to_v(context))``: computed once per context row, the query
    and key projections and the attention skipped (SVD's context is one CLIP image token).
    Returns [N, 1, C] (broadcast over the queries by the residual add) or [N, L_q, C]."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None and context.shape[1] == 1:
            return ops.linear(ops.linear(context, self.to_v), self.to_out[0])
        return super().forward(x, context)


class TemporalTransformerBlock(nn.Module):
    """sgm ``VideoTransformerBlock`` (diffusers ``TemporalBasicTransformerBlock``) on tokens
    regrouped per position [B * S, F, C]: ``ff_in`` (GEGLU) with a residual, self-attention over
    the frames, cross-attention on the sample's (first frame's) context, feed-forward;
    pre-LayerNorm each."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)
        self.attn1 = CrossAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = ImageCrossAttention(dim, heads, head_dim, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def cross(self, x: torch.Tensor, context: torch.Tensor, b: int, s: int) -> torch.Tensor:
        """attn2 of x [B * S, F, C] on the context [B, L, D], the same for every position of a
        sample (one token: computed once per sample, see :class:`ImageCrossAttention`)."""
        if context.shape[1] == 1:
            v = self.attn2(x, context)  # [B, 1, C]
            return v.expand(b, s, v.shape[-1]).reshape(b * s, 1, v.shape[-1])
        ctx = context[:, None].expand(b, s, *context.shape[1:]).reshape(b * s, *context.shape[1:])
        return self.attn2(x, ctx)

    def forward(self, x: torch.Tensor, frames: int, context: torch.Tensor) -> torch.Tensor:
        """x [B * F, S, C] (frame-minor); context [B, L, D] -> [B * F, S, C]."""
        bf, s, c = x.shape
        b = bf // frames
        x = x.view(b, frames, s, c).transpose(1, 2).reshape(b * s, frames, c)
        x = self.ff_in(self.norm_in(x)) + x
        x = self.attn1(self.norm1(x)) + x
        x = self.cross(self.norm2(x), context, b, s) + x
        x = self.ff(self.norm3(x)) + x
        return x.view(b, s, frames, c).transpose(1, 2).reshape(bf, s, c)


class VideoTransformer(SpatialTransformer):
    """sgm ``SpatialVideoTransformer`` (diffusers ``TransformerSpatioTemporalModel``): the SDXL
    spatial transformer, and after each of its blocks a temporal block on the tokens plus the
    frame embedding (``time_pos_embed`` of the frame index's sinusoid), mixed by ``time_mixer``."""

    def __init__(self, channels: int, depth: int, head_dim: int, context_dim: int):
        super().__init__(channels, depth, head_dim, context_dim)
        heads = channels // head_dim
        for block in self.transformer_blocks:  # the same tensors, one-token cross-attention shortcut
            block.attn2 = ImageCrossAttention(channels, heads, head_dim, context_dim)
        self.time_stack = nn.ModuleList(
            TemporalTransformerBlock(channels, heads, head_dim, context_dim) for _ in range(depth)
        )
        self.time_pos_embed = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, channels)
        )
        self.time_mixer = AlphaBlender()

    def forward(self, x: torch.Tensor, context: torch.Tensor, time_context: torch.Tensor, frames: int):
        """x [B * F, C, h, w]; context [B * F, L, D] (per frame); time_context [B, L, D] (per sample)."""
        bf, c, h, w = x.shape
        b, s = bf // frames, h * w
        t = F.group_norm(x, self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps)
        t = ops.linear(t.permute(0, 2, 3, 1).reshape(bf, s, c), self.proj_in)
        index = torch.arange(frames, device=x.device, dtype=torch.float32)
        pos = timestep_embedding(index, c).to(t.dtype)  # fp32 sinusoid, then the model's dtype
        pos = ops.linear(F.silu(ops.linear(pos, self.time_pos_embed[0])), self.time_pos_embed[2])  # [F, C]
        for block, temporal in zip(self.transformer_blocks, self.time_stack, strict=True):
            t = block(t, context)
            mix = (t.view(b, frames, s, c) + pos[None, :, None, :]).view(bf, s, c)
            t = self.time_mixer(t, temporal(mix, frames, time_context))
        t = ops.linear(t, self.proj_out)
        return x + t.reshape(bf, h, w, c).permute(0, 3, 1, 2)


class VideoSequential(nn.Sequential):
    """sgm's ``TimestepEmbedSequential`` for video: each layer gets what it takes."""

    def forward(self, x, emb_silu, context, time_context, frames: int, upsample_size=None):
        for layer in self:
            if isinstance(layer, VideoResBlock):
                x = layer(x, emb_silu, frames)
            elif isinstance(layer, VideoTransformer):
                x = layer(x, context, time_context, frames)
            elif isinstance(layer, Upsample):  # to the next skip's size, as diffusers' upsample_size
                x = layer.conv(F.interpolate(x, size=upsample_size, mode="nearest"))
            else:
                x = layer(x)
        return x


def _level_layers(cfg: SVDUNetConfig, channels_in: int, level: int, eps: float) -> list[nn.Module]:
    width, emb = cfg.widths[level], cfg.time_embed_dim
    layers = [VideoResBlock(channels_in, emb, width, eps)]
    if cfg.transformer_depth[level]:
        layers.append(VideoTransformer(width, cfg.transformer_depth[level], cfg.head_dim(level), cfg.context_dim))
    return layers


class VideoUNet(nn.Module):
    """out [B, F, 4, h, w] = VideoUNet(sample [B, F, 8, h, w], timestep, encoder_hidden_states
    [B, L, D], added_time_ids [B, 3]): diffusers' ``UNetSpatioTemporalConditionModel.forward``."""

    def __init__(self, config: SVDUNetConfig):
        super().__init__()
        self.config = cfg = config
        mc, emb = cfg.model_channels, cfg.time_embed_dim
        last = len(cfg.channel_mult) - 1
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(cfg.adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        )
        self.input_blocks = nn.ModuleList([VideoSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skips, ch = [mc], mc
        for level in range(last + 1):
            eps = EPS_ATTENTION_LEVELS if cfg.transformer_depth[level] else EPS_PLAIN
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(VideoSequential(*_level_layers(cfg, ch, level, eps)))
                ch = cfg.widths[level]
                skips.append(ch)
            if level != last:
                self.input_blocks.append(VideoSequential(Downsample(ch)))
                skips.append(ch)
        self.middle_block = VideoSequential(
            VideoResBlock(ch, emb, ch, EPS_PLAIN),
            VideoTransformer(ch, cfg.transformer_depth_middle, cfg.head_dim(last), cfg.context_dim),
            VideoResBlock(ch, emb, ch, EPS_PLAIN),
        )
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(last + 1)):
            for i in range(cfg.num_res_blocks + 1):
                layers = _level_layers(cfg, ch + skips.pop(), level, EPS_ATTENTION_LEVELS)
                ch = cfg.widths[level]
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(VideoSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].weight.dtype

    @property
    def num_blocks(self) -> int:
        """Entries of input_blocks, middle_block and output_blocks (what ``out.stats`` counts)."""
        return len(self.input_blocks) + 1 + len(self.output_blocks)

    def embedding(self, timesteps: torch.Tensor, added_time_ids: torch.Tensor) -> torch.Tensor:
        """[B, E]: time_embed(sinusoid(t)) + label_emb(sinusoids of the time ids), the sinusoids in
        fp32 from the values as given, then the model's dtype (as diffusers)."""
        cfg, dtype, b = self.config, self.dtype, len(added_time_ids)
        t_emb = timestep_embedding(timesteps.float(), cfg.model_channels).to(dtype)
        ids = timestep_embedding(added_time_ids.float().flatten(), cfg.time_id_dim).reshape(b, -1).to(dtype)
        mlp, label = self.time_embed, self.label_emb[0]
        time = ops.linear(F.silu(ops.linear(t_emb, mlp[0])), mlp[2])
        return time + ops.linear(F.silu(ops.linear(ids, label[0])), label[2])

    def check_inputs(self, sample, timesteps, context, added_time_ids) -> None:
        cfg = self.config
        if sample.ndim != 5 or sample.shape[2] != cfg.in_channels or min(sample.shape) < 1:
            raise InputError(f"sample must be [B, F, {cfg.in_channels}, h, w], got {list(sample.shape)}")
        b = sample.shape[0]
        if timesteps.ndim > 1 or timesteps.numel() not in (1, b):
            raise InputError(f"timestep must be a number or [{b}] values, got shape {list(timesteps.shape)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.context_dim or not context.shape[1]:
            raise InputError(f"encoder_hidden_states must be [{b}, L, {cfg.context_dim}], got {list(context.shape)}")
        if tuple(added_time_ids.shape) != (b, cfg.num_time_ids):
            raise InputError(
                f"added_time_ids must be [{b}, {cfg.num_time_ids}] (fps - 1, motion_bucket_id, noise_aug_strength), "
                f"got {list(added_time_ids.shape)}"
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        deep_cache=None,
    ) -> torch.Tensor:
        """``timestep``: a number, a 0-d / [1] tensor or one per sample [B] (diffusers' EDM
        timesteps 0.25 * ln(sigma)). ``deep_cache``: DeepCache's plan, as for the SDXL UNet."""
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if not torch.compiler.is_compiling():
            self.check_inputs(sample, timesteps, encoder_hidden_states, added_time_ids)
        b, frames = sample.shape[:2]
        dtype = self.dtype
        emb = self.embedding(timesteps.reshape(-1).expand(b), added_time_ids)
        emb_silu = F.silu(emb).repeat_interleave(frames, dim=0)  # [B * F, E], frame-minor
        time_context = encoder_hidden_states.to(dtype)  # [B, L, D]: the first frame's (all frames share it)
        context = time_context.repeat_interleave(frames, dim=0)
        h, skips = sample.flatten(0, 1).to(dtype), []
        args = (emb_silu, context, time_context, frames)
        shallow, first, keep = deep_range(self, deep_cache)
        for block in self.input_blocks[: len(self.input_blocks) - first]:
            h = block(h, *args)
            skips.append(h)
        h = deep_cache.feature if shallow else self.middle_block(h, *args)
        for j, block in enumerate(self.output_blocks[first:], first):
            if j == keep:
                deep_cache.feature = h
            h = torch.cat((h, skips.pop()), dim=1)
            h = block(h, *args, upsample_size=skips[-1].shape[-2:] if skips else None)
        h = self.out[2](_norm_silu(self.out[0], h))
        return h.view(b, frames, *h.shape[1:])
