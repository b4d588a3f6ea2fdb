"""Stable Video Diffusion (issue 36) configs, registered in :mod:`.configs`' registry.

One section per component: the spatio-temporal UNet here; the temporal-decoder VAE and the CLIP
image encoder add their configs in their own sections below (same pattern: a frozen dataclass,
registered full-size names and a tiny one for the tests). Full-size values are the hub configs
of stabilityai/stable-video-diffusion-img2vid(-xt) (= sgm's configs/inference/svd.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

from .configs import UNetConfig, _check_groups, _Config, register

# -- the spatio-temporal UNet (models/unet_video.py) ------------------------------------------------


@dataclass(frozen=True)
class SVDUNetConfig(_Config):
    """sgm's ``VideoUNet`` / diffusers' ``UNetSpatioTemporalConditionModel``. Levels of
    ``model_channels * channel_mult[i]`` channels with ``num_res_blocks`` spatio-temporal ResNet
    blocks each; ``transformer_depth[i]`` spatial + temporal transformer blocks per block (0: no
    transformer at that level), ``num_heads[i]`` heads (diffusers' ``num_attention_heads``; sgm
    states ``num_head_channels`` 64, the same heads at full size); the added embedding takes
    three ids (fps - 1, motion bucket, noise augmentation) as sinusoids of ``time_id_dim`` each.
    ``num_frames``: the frames the model was trained for (14 SVD, 25 SVD-XT), the pipeline's
    default; not visible in the weights, and no part of the math (any frame count runs).
    ``num_heads`` and ``time_id_dim`` are not visible in the weights either (a diffusers folder's
    config.json states them), so ``arch()`` leaves them out."""

    name: str
    in_channels: int = 8  # noise latents + the conditioning image's latents
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    num_heads: tuple[int, ...] = (5, 10, 20, 20)
    context_dim: int = 1024  # the CLIP image embedding
    time_id_dim: int = 256
    num_time_ids: int = 3
    num_frames: int = 14

    family = "svd"

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def adm_in_channels(self) -> int:
        return self.num_time_ids * self.time_id_dim

    @property
    def widths(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    def head_dim(self, level: int) -> int:
        return self.widths[level] // self.num_heads[level]

    arch = UNetConfig.arch  # the same architecture fields as the SDXL UNet's

    def __post_init__(self):
        n = len(self.channel_mult)
        if len(self.transformer_depth) != n or len(self.num_heads) != n:
            raise ValueError(f"{self.name}: one transformer_depth and one num_heads per level of channel_mult")
        if any(w % h for w, h in zip(self.widths, self.num_heads, strict=True)):
            raise ValueError(f"{self.name}: every level's width must be a multiple of its num_heads")
        if self.num_frames < 1:
            raise ValueError(f"{self.name}: num_frames must be at least 1")
        _check_groups(self.name, 32, self.widths)  # diffusers and sgm fix 32 groups in this model


_SVD_UNET = SVDUNetConfig(name="svd")
register(_SVD_UNET)
register(_SVD_UNET.replace(name="svd-xt", num_frames=25))
# Tiny (tests): two levels of 32 / 64 channels (attention on the first only), heads of 16 / 32,
# an 8-wide image embedding, ids of 8 (diffusers' dummy SVD UNet is (32, 64), heads 8, cross 32).
_SVD_UNET_TINY = SVDUNetConfig(
    name="svd-tiny",
    model_channels=32,
    channel_mult=(1, 2),
    transformer_depth=(1, 0),
    num_heads=(2, 2),
    context_dim=16,
    time_id_dim=8,
    num_frames=3,
)
register(_SVD_UNET_TINY)

# -- the temporal-decoder VAE (its helper adds its config here) -------------------------------------

# -- the CLIP ViT-H/14 image encoder (its helper adds its config here) ------------------------------
