"""CLIP's vision tower with its projection (transformers' CLIPVisionModelWithProjection), owned here:
Stable Video Diffusion's image encoder (OpenCLIP ViT-H/14), run without transformers.

The module keeps transformers' parameter names, which are the names of the published
``image_encoder/`` folders (``vision_model.embeddings.{class_embedding, patch_embedding,
position_embedding}``, ``vision_model.pre_layrnorm``, ``vision_model.encoder.layers.N...``,
``vision_model.post_layernorm``, ``visual_projection``), so those files load unchanged; the official
SVD single files hold the tower in open_clip's names, mapped by ``loading/keymaps_clip_vision.py``.
The encoder layers are :mod:`fastflow.models.text`'s CLIP layers built non-causal (attention through
:func:`fastflow.ops.attention`, every linear through :func:`fastflow.ops.linear`). The math is
transformers' (held to 1e-5 in fp32 by the parity tests):

    patches (conv, stride = kernel = patch, no bias) -> [class embedding | patches] + positions
    -> pre_layrnorm -> pre-LN layers (bidirectional) -> post_layernorm(state of the class token)
    -> visual_projection (no bias) = image_embeds
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .. import ops
from ..errors import InputError
from .text import ACTIVATIONS, CLIPStack, _Module


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' CLIPVisionConfig the forward reads (defaults are transformers')."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise InputError(
                f"CLIP vision activation {self.hidden_act!r} is not implemented: "
                f"use one of {', '.join(sorted(ACTIVATIONS))}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise InputError(
                f"CLIP vision hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} "
                "heads: check the image encoder's config.json"
            )
        if self.image_size % self.patch_size:
            raise InputError(
                f"CLIP vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}: "
                "check the image encoder's config.json"
            )

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


# SVD's image encoder (stabilityai/stable-video-diffusion-img2vid*/image_encoder/config.json):
# OpenCLIP ViT-H/14 (laion2b_s32b_b79k), exact (erf) GELU, 16 heads of 80.
SVD_IMAGE_ENCODER = CLIPVisionConfig(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=1024,
)


class CLIPVisionOutput(NamedTuple):
    image_embeds: torch.Tensor  # [B, P] projected pooled state
    last_hidden_state: torch.Tensor  # [B, 1 + patches, W] the last layer's output (no post-LN)
    pooler_output: torch.Tensor  # [B, W] post_layernorm of the class token's state


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixels.to(weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, W]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat((cls, patches), dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: transformers' name
        self.encoder = CLIPStack(cfg, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPVisionModelWithProjection(_Module):
    """pixel_values [B, C, image_size, image_size] (already CLIP-normalised) -> :class:`CLIPVisionOutput`."""

    def __init__(self, cfg: CLIPVisionConfig = SVD_IMAGE_ENCODER):
        super().__init__()
        self.config = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def check_pixels(self, pixels: torch.Tensor) -> None:
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or tuple(pixels.shape[1:]) != want:
            got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise InputError(
                f"the CLIP image encoder takes pixel values [B, {', '.join(map(str, want))}], got {got}: "
                "preprocess images with fastflow.pipelines.video_images.clip_pixels (resized to "
                f"{cfg.image_size}x{cfg.image_size} and normalised)"
            )

    def forward(self, pixel_values: torch.Tensor) -> CLIPVisionOutput:
        self.check_pixels(pixel_values)
        vision = self.vision_model
        x = vision.pre_layrnorm(vision.embeddings(pixel_values))
        for layer in vision.encoder.layers:
            x = layer(x)
        pooled = vision.post_layernorm(x[:, 0])
        return CLIPVisionOutput(ops.linear(pooled, self.visual_projection), x, pooled)
