"""The AutoencoderKL of FLUX.1 and SD3 (16 channels, official ``ae.safetensors`` names) and of SDXL
(4 channels, with ``quant_conv`` / ``post_quant_conv``).

Architecture: REFERENCE.md section 3.3; latent scale/shift: section 3.2. GroupNorm + SiLU runs
through ``fastflow::groupnorm_silu`` and the mid-block single-head attention through
``fastflow::attention``. Encoding returns the mean (FLUX / Kontext reference behaviour).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import InputError
from .configs import VAEConfig


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def set_groups(module: nn.Module, groups: int) -> None:
    """Every GroupNorm of ``module`` with ``groups`` groups (the config's norm_num_groups; the
    weights are per channel, so only the grouping changes)."""
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            m.num_groups = groups


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return ops.groupnorm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_norm_silu(self.norm1, x))
        h = self.conv2(_norm_silu(self.norm2, h))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (d = C, scale 1/sqrt(C)), 1x1 conv q/k/v/proj."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def heads(t):  # [B, C, h, w] -> [B, 1, h*w, C]
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        out = ops.attention(heads(self.q(hn)), heads(self.k(hn)), heads(self.v(hn)))
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric zero pad, then stride-2 conv


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block`` (res blocks) and an optional ``downsample`` / ``upsample``."""

    def __init__(self, channels_in: int, channels_out: int, n_blocks: int):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(channels_in if i == 0 else channels_out, channels_out) for i in range(n_blocks)
        )


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = (1, *cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, m in enumerate(cfg.ch_mult):
            level = _Level(cfg.ch * mult[i], cfg.ch * m, cfg.num_res_blocks)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(cfg.ch * m)
            self.down.append(level)
        top = cfg.ch * cfg.ch_mult[-1]
        self.mid = _Mid(top)
        self.norm_out = _norm(top)
        self.conv_out = nn.Conv2d(top, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(_norm_silu(self.norm_out, self.mid(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        top = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = _Mid(top)
        levels = []
        channels = top
        for i in reversed(range(len(cfg.ch_mult))):  # built from the lowest resolution up
            level = _Level(channels, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1)
            channels = cfg.ch * cfg.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(channels)
            levels.insert(0, level)  # official index: up.0 is the highest resolution
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_norm_silu(self.norm_out, h))


class AutoEncoder(nn.Module):
    """Images in [-1, 1] [B, 3, H, W] <-> scaled latents [B, 16, H/8, W/8]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.quant_conv:
            z = config.z_channels
            self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
            self.post_quant_conv = nn.Conv2d(z, z, 1)
        set_groups(self, config.norm_groups)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled latent of the posterior mean: scale * (mean - shift)."""
        return self.scale(self.posterior(x)[0])

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior (mean, std) [B, z, H/f, W/f] of images in [-1, 1]; the log-variance
        clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does."""
        f = self.downscale
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[-2] % f or x.shape[-1] % f:
            raise InputError(
                f"images must be [B, {self.config.in_channels}, H, W] with H, W multiples of {f}, got {list(x.shape)}"
            )
        moments = self.encoder(x.to(self.dtype))
        if self.config.quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """An unscaled latent as the transformer sees it: scale * (z - shift)."""
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode(self, z: torch.Tensor, tiled: bool | None = None, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """Image in [-1, 1] (not clamped) from a scaled latent.

        ``tiled``: True decodes overlapping ``tile``-latent tiles and blends the seams; None (default)
        decodes whole and falls back to tiles, with a warning, when the device runs out of memory.
        """
        if z.ndim != 4 or z.shape[1] != self.config.z_channels:
            raise InputError(f"latents must be [B, {self.config.z_channels}, h, w], got {list(z.shape)}")
        decoder = self._decoder()
        z = z.to(self.dtype) / self.config.scale_factor + self.config.shift_factor
        if self.config.quant_conv:
            z = decoder(z, self.post_quant_conv)  # pointwise: before tiling
        if tiled:
            return self._tiled_decode(z, tile, overlap, decoder)
        try:
            return decoder(z)
        except torch.OutOfMemoryError:
            if tiled is False:
                raise
            warnings.warn(
                f"VAE decode of a {z.shape[-2]}x{z.shape[-1]} latent ran out of memory; retrying in "
                f"{tile}x{tile} tiles (seams blended over {overlap} latents)",
                RuntimeWarning,
                stacklevel=2,
            )
            if z.is_cuda:
                torch.cuda.empty_cache()
            return self._tiled_decode(z, tile, overlap, decoder)

    def _decoder(self):
        """decode(z, module=self.decoder): the module run as it is, or, for a float16 VAE whose
        config says ``force_upcast`` (SDXL's: its activations overflow fp16), run in float32 on
        fp32 copies of its weights (made once per decode; the module itself is not touched, so
        concurrent calls are safe). Upcast results are float32."""
        if not (self.config.force_upcast and self.dtype == torch.float16):
            return lambda z, module=self.decoder: module(z)
        copies: dict[nn.Module, dict] = {}

        def run(z, module=self.decoder):
            if module not in copies:
                copies[module] = {k: v.float() for k, v in module.state_dict().items()}
            return torch.func.functional_call(module, copies[module], (z.float(),))

        return run

    def _tiled_decode(self, z: torch.Tensor, tile: int, overlap: int, decoder=None) -> torch.Tensor:
        """Decode overlapping tiles; blend with linear ramps over the overlaps (weights sum to 1)."""
        upcast = self.config.force_upcast and self.dtype == torch.float16
        decoder = decoder or self._decoder()
        if not 0 <= overlap < tile:
            raise InputError(f"tile overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
        f = self.downscale
        b, _, h, w = z.shape
        out = None
        weight = torch.zeros(1, 1, h * f, w * f, device=z.device, dtype=torch.float32)
        for top in _tile_starts(h, tile, overlap):
            for left in _tile_starts(w, tile, overlap):
                piece = decoder(z[:, :, top : top + tile, left : left + tile]).float()
                if out is None:
                    out = torch.zeros(b, piece.shape[1], h * f, w * f, device=z.device, dtype=torch.float32)
                ramp = _ramp(piece.shape[-2], overlap * f, top > 0, top + tile < h, z.device)[:, None]
                ramp = ramp * _ramp(piece.shape[-1], overlap * f, left > 0, left + tile < w, z.device)[None, :]
                rows, cols = slice(top * f, top * f + piece.shape[-2]), slice(left * f, left * f + piece.shape[-1])
                out[:, :, rows, cols] += piece * ramp
                weight[:, :, rows, cols] += ramp
        return (out / weight).to(torch.float32 if upcast else self.dtype)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]  # the last tile ends exactly at the border


def _ramp(n: int, width: int, fade_in: bool, fade_out: bool, device) -> torch.Tensor:
    """1 in the interior, rising/falling linearly over ``width`` pixels at the overlapped ends."""
    r = torch.ones(n, device=device)
    width = min(width, n)
    if width and fade_in:
        r[:width] = torch.minimum(r[:width], torch.arange(1, width + 1, device=device) / (width + 1))
    if width and fade_out:
        r[-width:] = torch.minimum(r[-width:], torch.arange(width, 0, -1, device=device) / (width + 1))
    return r
