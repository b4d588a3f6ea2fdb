"""Shared fixtures: tiny random-weight FLUX models built with diffusers' own class (the reference)."""

from __future__ import annotations

import pytest
import torch

from fastflow.models.configs import from_name


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    is_sm90 = has_cuda and torch.cuda.get_device_capability() >= (9, 0)
    for item in items:
        if "requires_cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "requires_sm90" in item.keywords and not is_sm90:
            item.add_marker(pytest.mark.skip(reason="needs an sm_90 GPU"))


def tiny_diffusers_flux(variant: str = "flux-tiny-dev", seed: int = 0):
    """diffusers FluxTransformer2DModel of a tiny registered config, every weight random.

    Norm scales are drawn around 1 and everything else around 0, so that no parameter keeps its
    default init (a swapped or dropped tensor must change the output).
    """
    from diffusers import FluxTransformer2DModel

    cfg = from_name(variant)
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim,
        guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=cfg.axes_dim,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def tiny_diffusers_sd3(variant: str = "sd3-tiny-medium", seed: int = 0):
    """diffusers SD3Transformer2DModel of a tiny registered MMDiT config, every weight random,
    including the stored pos_embed (so that loading it, not recomputing it, is what is tested)."""
    from diffusers import SD3Transformer2DModel

    cfg = from_name(variant)
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=2 * cfg.pos_embed_max_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.adm_in_dim,
        out_channels=cfg.out_channels,
        pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=cfg.dual_attention_layers,
        qk_norm="rms_norm" if cfg.qk_norm else None,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = ".norm_" in name and name.endswith(".weight") and p.ndim == 1
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if is_norm_scale else 0.1 * torch.randn_like(p))
        model.pos_embed.pos_embed.copy_(torch.randn_like(model.pos_embed.pos_embed))
    return model


def tiny_diffusers_vae(variant: str = "vae-tiny-flux", seed: int = 0):
    """diffusers AutoencoderKL of a tiny registered VAE config (REFERENCE.md 5.5), random weights."""
    from diffusers import AutoencoderKL

    cfg = from_name(variant)
    torch.manual_seed(seed)
    n = len(cfg.ch_mult)
    model = AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=32,
        scaling_factor=cfg.scale_factor,
        shift_factor=cfg.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name and p.ndim == 1
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif not is_norm:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))  # keep diffusers' init scale, perturbed
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model
