"""Whole models for bench/e2e.py: diffusers' own classes built at a registered fastflow config (full
size, or a tiny one for the dry run) with random weights drawn on the target device, fastflow's
model holding the very same weights (moved through fastflow's diffusers key maps, in memory: no
file is written), and one step's inputs at the benchmark resolution.

Kinds: "flux" (FluxTransformer2DModel), "sd3" (SD3Transformer2DModel), "unet"
(UNet2DConditionModel, SDXL) and "vae" (AutoencoderKL, decode only).
"""

from __future__ import annotations

import contextlib

import torch

from fastflow.models import from_name

# bench model name -> (kind, fastflow config at full size, tiny config for --dry-run, latent side at 1024^2)
MODELS = {
    "flux-dev": ("flux", "flux-dev", "flux-tiny-dev", 64),  # 64 x 64 patches = 4096 image tokens
    "sd3.5-large": ("sd3", "sd3.5-large", "sd3.5-tiny-large", 128),
    "sdxl-base": ("unet", "sdxl-base", "sdxl-tiny", 128),
    "sdxl-vae": ("vae", "sdxl-vae", "vae-tiny-sdxl", 128),
}
TEXT_TOKENS = {"flux": 512, "sd3": 333, "unet": 77}  # T5 512 (FLUX.1-dev); CLIP 77 + T5 256 (SD3.5); CLIP 77


@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _diffusers_kwargs(kind: str, cfg) -> tuple[str, dict]:
    if kind == "flux":
        return "FluxTransformer2DModel", dict(
            patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
            attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
            pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed, axes_dims_rope=cfg.axes_dim,
        )  # fmt: skip
    if kind == "sd3":
        return "SD3Transformer2DModel", dict(
            sample_size=2 * cfg.pos_embed_max_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
            num_layers=cfg.depth, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.context_in_dim, caption_projection_dim=cfg.hidden_size,
            pooled_projection_dim=cfg.adm_in_dim, out_channels=cfg.out_channels,
            pos_embed_max_size=cfg.pos_embed_max_size, dual_attention_layers=cfg.dual_attention_layers,
            qk_norm="rms_norm" if cfg.qk_norm else None,
        )  # fmt: skip
    if kind == "unet":
        widths = tuple(cfg.model_channels * m for m in cfg.channel_mult)
        attn = [d > 0 for d in cfg.transformer_depth]
        return "UNet2DConditionModel", dict(
            sample_size=128, in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=widths,
            layers_per_block=cfg.num_res_blocks,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            transformer_layers_per_block=tuple(max(d, 1) for d in cfg.transformer_depth),
            attention_head_dim=tuple(w // cfg.head_dim for w in widths), cross_attention_dim=cfg.context_dim,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=cfg.time_id_dim,
            projection_class_embeddings_input_dim=cfg.adm_in_channels, norm_num_groups=32,
        )  # fmt: skip
    n = len(cfg.ch_mult)
    return "AutoencoderKL", dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels, norm_num_groups=32,
        scaling_factor=cfg.scale_factor, shift_factor=cfg.shift_factor, use_quant_conv=cfg.quant_conv,
        use_post_quant_conv=cfg.quant_conv, force_upcast=cfg.force_upcast,
    )  # fmt: skip


def diffusers_model(kind: str, config_name, device, dtype, seed: int = 0):
    """diffusers' model of ``config_name`` (a registered name, or a config), built on ``device`` in
    ``dtype``; every weight random and reproducible from ``seed``: diffusers' init perturbed by 20%
    (norm scales around 1, parameters diffusers zero-initialises drawn at 0.02), so no block is an
    identity."""
    import diffusers

    cfg = from_name(config_name) if isinstance(config_name, str) else config_name
    cls_name, kwargs = _diffusers_kwargs(kind, cfg)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = getattr(diffusers, cls_name)(**kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif not p.any():
                p.copy_(0.02 * noise)
            else:
                p.mul_(1.0 + 0.2 * noise)
    return model.to(device=device, dtype=dtype), cfg


def fastflow_model(kind: str, cfg, theirs):
    """fastflow's model of ``cfg`` holding ``theirs``' weights (fastflow's diffusers key maps, on
    ``theirs``' device and dtype)."""
    from fastflow.loading import keymaps
    from fastflow.models import AutoEncoder, Flux, MMDiT
    from fastflow.models.unet import UNet

    cls, keymap = {
        "flux": (Flux, keymaps.flux_from_diffusers),
        "sd3": (MMDiT, keymaps.sd3_from_diffusers),
        "unet": (UNet, keymaps.unet_from_diffusers),
        "vae": (AutoEncoder, keymaps.vae_from_diffusers),
    }[kind]
    with torch.device("meta"):
        ours = cls(cfg)
    src = theirs.state_dict()
    state = {k: torch.cat([s.take(src[s.key]) for s in keymap(k, cfg)]) for k in ours.state_dict()}
    ours.load_state_dict(state, assign=True)
    param = next(theirs.parameters())
    return ours.eval().to(device=param.device, dtype=param.dtype)


def inputs(kind: str, cfg, side: int, device, dtype, seed: int = 1, text_tokens: int | None = None):
    """(diffusers call, fastflow call): two functions of a model that run one step (the VAE: one
    decode) on the same inputs, [B=1] at a latent ``side`` (128: 1024^2 images)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    txt = text_tokens or TEXT_TOKENS.get(kind, 0)
    if kind == "flux":
        from fastflow.models.flux import make_img_ids

        img, ctx, pooled = rnd(1, side * side, cfg.in_channels), rnd(1, txt, cfg.context_in_dim), rnd(1, cfg.vec_in_dim)
        ids = make_img_ids(side, side).to(device)
        t, guidance = torch.tensor([0.5], device=device, dtype=dtype), torch.tensor([3.5], device=device, dtype=dtype)
        extra = {"guidance": guidance} if cfg.guidance_embed else {}
        txt_ids = torch.zeros(txt, 3, device=device, dtype=dtype)

        def theirs(m):
            return m(hidden_states=img, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                     img_ids=ids.to(dtype), txt_ids=txt_ids, **extra).sample  # fmt: skip

        return theirs, lambda m: m(img, ctx, pooled, t, ids, **extra)
    if kind == "sd3":
        x, ctx, y = rnd(1, cfg.in_channels, side, side), rnd(1, txt, cfg.context_in_dim), rnd(1, cfg.adm_in_dim)
        t = torch.tensor([500.0], device=device)  # sigma * 1000
        return (lambda m: m(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample,
                lambda m: m(x, t, ctx, y))  # fmt: skip
    if kind == "unet":
        x, ctx, pooled = rnd(1, cfg.in_channels, side, side), rnd(1, txt, cfg.context_dim), rnd(1, cfg.pooled_dim)
        ids = torch.tensor([[8.0 * side, 8.0 * side, 0, 0, 8.0 * side, 8.0 * side]], device=device, dtype=dtype)
        t = torch.tensor([500.0], device=device)
        cond = {"text_embeds": pooled, "time_ids": ids}
        return lambda m: m(x, t, ctx, added_cond_kwargs=cond).sample, lambda m: m(x, t, ctx, pooled, ids)
    z = rnd(1, cfg.z_channels, side, side)  # a scaled latent, as the pipelines hand it to the VAE
    raw = z / cfg.scale_factor + cfg.shift_factor
    return lambda m: m.decode(raw).sample, lambda m: m.decode(z, tiled=False)


def compile_blocks(module: torch.nn.Module, backend: str) -> int:
    """Regional compilation: every block of every ModuleList (the repeated transformer / UNet
    blocks) compiled in place, so a 57-block FLUX compiles two block graphs, not one huge graph.
    A model without such lists is compiled whole. Returns the number of modules compiled."""

    def walk(m) -> int:
        n = 0
        for child in m.children():
            if isinstance(child, torch.nn.ModuleList) and len(child) > 1:
                for block in child:
                    block.compile(backend=backend, dynamic=False)
                    n += 1
            else:
                n += walk(child)
        return n

    n = walk(module)
    if not n:
        module.compile(backend=backend, dynamic=False)
        n = 1
    return n
