"""The temporal-decoder VAE of Stable Video Diffusion (diffusers' AutoencoderKLTemporalDecoder,
sgm's ``first_stage_model`` with a ``VideoDecoder``), in the official sgm names.

Encoder: the SD / SDXL VAE encoder of ``models/vae.py`` plus ``quant_conv`` (no post_quant_conv).
Decoder: the SD decoder whose ResNet blocks each add a temporal block (``time_stack``: GroupNorm
eps 1e-5, SiLU, Conv3d with kernel [3, 1, 1] over the frames, twice, residual) mixed with the
spatial result by a learned ``mix_factor`` (``out = (1 - a) * spatial + a * temporal``,
a = sigmoid(mix_factor): diffusers' AlphaBlender "learned" with the spatial / temporal switch,
sgm's temporal_ae VideoResBlock), and a last Conv3d ``conv_out.time_mix_conv`` over the frames.
The frames of one ``decode`` call are one clip: the temporal convolutions zero-pad at its first and
last frame and the temporal GroupNorms take statistics over all its frames, so what
``decode_chunks`` returns depends on the chunk size, exactly as diffusers' pipeline.

GroupNorm + SiLU runs through ``fastflow::groupnorm_silu``, the mid-block attention through
``fastflow::attention`` (the blocks of ``models/vae.py``).

The config lives here (``VideoVAEConfig``) until a ``models/configs_svd.py`` takes it over.
In the official single files the decoder is ``first_stage_model.decoder.*``; the encoder and
``quant_conv`` sgm uses at inference are ``conditioner.embedders.3.encoder.{encoder,quant_conv}.*``
(see ``loading/keymaps_svd_vae.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import InputError
from .configs import VAEConfig, _Config
from .vae import AttnBlock, Encoder, ResnetBlock, Upsample


@dataclass(frozen=True)
class VideoVAEConfig(_Config):
    """AutoencoderKLTemporalDecoder (SVD, SVD-XT and 1.1 share it). GroupNorms have 32 groups
    (diffusers' class has no norm_num_groups)."""

    name: str
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more a level
    z_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    scale_factor: float = 0.18215
    # encode a float16 VAE in float32 (diffusers' pipeline does; it decodes in float16)
    force_upcast: bool = True

    family = "vae-video"

    def __post_init__(self):
        if not (isinstance(self.scale_factor, (int, float)) and math.isfinite(self.scale_factor) and self.scale_factor):
            raise InputError(f"VAE scale_factor must be a finite non-zero number, got {self.scale_factor!r}")
        if self.num_res_blocks < 1 or not self.ch_mult:
            raise InputError(f"{self.name}: num_res_blocks must be >= 1 and ch_mult non-empty")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            raise InputError(f"{self.name}: VAE widths {bad} are not multiples of the 32 GroupNorm groups")

    def encoder_config(self) -> VAEConfig:
        """The SD VAE config whose encoder (+ quant_conv) this VAE's encoder is."""
        return VAEConfig(
            name=self.name,
            ch=self.ch,
            ch_mult=tuple(self.ch_mult),
            num_res_blocks=self.num_res_blocks,
            z_channels=self.z_channels,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            scale_factor=self.scale_factor,
            shift_factor=0.0,
            quant_conv=True,
        )

    def arch(self) -> tuple:
        return (
            self.ch,
            tuple(self.ch_mult),
            self.num_res_blocks,
            self.z_channels,
            self.in_channels,
            self.out_channels,
        )


VIDEO_VAE_CONFIGS = {
    "svd-vae": VideoVAEConfig("svd-vae"),
    # tiny, for tests: two levels, two res blocks (so diffusers' mid block runs its attention)
    "svd-vae-tiny": VideoVAEConfig("svd-vae-tiny", ch=32, ch_mult=(1, 2)),
}


def _gn_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return ops.groupnorm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


def _time_conv(channels: int) -> nn.Conv3d:
    """Kernel 3 along the frames, zero-padded at the clip's first and last frame."""
    return nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))


class _TimeStack(nn.Module):
    """sgm's openaimodel ResBlock with dims=3, kernel [3, 1, 1] and no time embedding, on
    [B, C, F, h, w]: x + conv(SiLU(GN(conv(SiLU(GN(x)))))). GroupNorm eps 1e-5 (GroupNorm32)."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels, eps=1e-5), nn.SiLU(), _time_conv(channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, channels, eps=1e-5), nn.SiLU(), nn.Identity(), _time_conv(channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[2](_gn_silu(self.in_layers[0], x))
        return x + self.out_layers[3](_gn_silu(self.out_layers[0], h))


def _clip(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[B*F, C, h, w] -> [B, C, F, h, w] (a view)."""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, h, w] -> [B*F, C, h, w]."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


class VideoResnetBlock(ResnetBlock):
    """The SD VAE ResNet block on each frame, then its temporal block over the clip, mixed:
    (1 - a) * spatial + a * temporal, a = sigmoid(mix_factor) (diffusers: alpha = 1 - sigmoid,
    alpha * spatial + (1 - alpha) * temporal, computed the same way here)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        self.time_stack = _TimeStack(out_channels)
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        spatial = _clip(super().forward(x), frames)
        temporal = self.time_stack(spatial)
        alpha = 1.0 - torch.sigmoid(self.mix_factor).to(spatial.dtype)
        return _frames(alpha * spatial + (1.0 - alpha) * temporal)


class _VideoMid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = VideoResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = VideoResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x, frames)), frames)


class _VideoLevel(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, n_blocks: int):
        super().__init__()
        self.block = nn.ModuleList(
            VideoResnetBlock(channels_in if i == 0 else channels_out, channels_out) for i in range(n_blocks)
        )


class _TimeMixConvOut(nn.Conv2d):
    """sgm's AE3DConv: the 3x3 conv_out on each frame, then ``time_mix_conv`` [3, 1, 1] over the clip."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__(channels_in, channels_out, 3, padding=1)
        self.time_mix_conv = _time_conv(channels_out)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return _frames(self.time_mix_conv(_clip(super().forward(x), frames)))


class VideoDecoder(nn.Module):
    """sgm's VideoDecoder (time_mode "conv-only"): official names, ``up.0`` the highest resolution."""

    def __init__(self, cfg: VideoVAEConfig):
        super().__init__()
        top = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = _VideoMid(top)
        levels = []
        channels = top
        for i in reversed(range(len(cfg.ch_mult))):
            level = _VideoLevel(channels, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1)
            channels = cfg.ch * cfg.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(channels)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(32, channels, eps=1e-6)
        self.conv_out = _TimeMixConvOut(channels, cfg.out_channels)

    def forward(self, z: torch.Tensor, frames: int) -> torch.Tensor:
        h = self.mid(self.conv_in(z), frames)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h, frames)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_gn_silu(self.norm_out, h), frames)


class VideoAutoEncoder(nn.Module):
    """Images in [-1, 1] [N, 3, H, W] -> unscaled latent means [N, 4, H/8, W/8] (SVD conditions on
    them unscaled); unscaled latents [B*F, 4, h, w] of B clips of F frames -> frames [B*F, 3, H, W]."""

    def __init__(self, config: VideoVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder_config())
        z = config.z_channels
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.decoder = VideoDecoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior (mean, std) of images in [-1, 1], the log-variance clamped to
        [-30, 20] (diffusers' DiagonalGaussianDistribution). A float16 VAE whose config says
        ``force_upcast`` encodes in float32 on float32 copies of the encoder's weights (the
        module is not touched), as diffusers' pipeline does; the results are cast back to float16."""
        f = self.downscale
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[-2] % f or x.shape[-1] % f:
            raise InputError(
                f"images must be [N, {self.config.in_channels}, H, W] with H, W multiples of {f}, got {list(x.shape)}"
            )
        if self.config.force_upcast and self.dtype == torch.float16:
            weights = {k: v.float() for k, v in self.encoder.state_dict().items()}
            h = torch.func.functional_call(self.encoder, weights, (x.float(),))
            moments = F.conv2d(h, self.quant_conv.weight.float(), self.quant_conv.bias.float())
        else:
            moments = self.quant_conv(self.encoder(x.to(self.dtype)))
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean.to(self.dtype), std.to(self.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled posterior mean (= mode; diffusers' ``latent_dist.mode()``)."""
        return self.posterior(x)[0]

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        return self.config.scale_factor * z

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Frames [B*F, 3, H, W] in [-1, 1] (not clamped) of UNSCALED latents [B*F, 4, h, w] holding
        B clips of ``num_frames`` frames each, as diffusers' ``vae.decode(z, num_frames)``."""
        if z.ndim != 4 or z.shape[1] != self.config.z_channels:
            raise InputError(f"latents must be [B*F, {self.config.z_channels}, h, w], got {list(z.shape)}")
        if not isinstance(num_frames, int) or num_frames < 1 or z.shape[0] % num_frames:
            raise InputError(f"num_frames must be a positive divisor of the {z.shape[0]} latents, got {num_frames!r}")
        return self.decoder(z.to(self.dtype), num_frames)

    def decode_chunks(
        self,
        latents: torch.Tensor,
        num_frames: int,
        chunk: int | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Clips [B, 3, F, H, W] float32 of SCALED latents [B, F, 4, h, w] (or [B*F, 4, h, w]), as
        diffusers' pipeline ``decode_latents``: unscaled by 1 / scale_factor, decoded ``chunk``
        latents at a time over the flattened B*F axis, each chunk as one clip (a chunk can span two
        videos when B > 1, as in diffusers). ``chunk`` None: all frames at once. Peak memory
        follows the chunk. ``callback(done, total)`` after each chunk."""
        if latents.ndim == 5:
            if latents.shape[1] != num_frames:
                raise InputError(f"latents [B, F, C, h, w] have {latents.shape[1]} frames, not {num_frames}")
            latents = latents.flatten(0, 1)
        if latents.ndim != 4 or not isinstance(num_frames, int) or num_frames < 1 or latents.shape[0] % num_frames:
            raise InputError(
                f"latents must be [B, {num_frames}, C, h, w] or [B*{num_frames}, C, h, w], got {list(latents.shape)}"
            )
        total = latents.shape[0]
        chunk = total if chunk is None else chunk
        if not isinstance(chunk, int) or chunk < 1:
            raise InputError(f"decode chunk size must be a positive integer, got {chunk!r}")
        latents = (1.0 / self.config.scale_factor) * latents
        f = self.downscale
        h, w = latents.shape[-2] * f, latents.shape[-1] * f
        out = torch.empty(total, self.config.out_channels, h, w, device=latents.device, dtype=torch.float32)
        for i in range(0, total, chunk):
            piece = latents[i : i + chunk]
            out[i : i + piece.shape[0]] = self.decode(piece, piece.shape[0])
            if callback is not None:
                callback(min(i + chunk, total), total)
        return out.reshape(-1, num_frames, *out.shape[1:]).permute(0, 2, 1, 3, 4)
