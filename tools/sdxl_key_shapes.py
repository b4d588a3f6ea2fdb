"""Write tests/data/sdxl_key_shapes.json: the official (sgm) names and shapes of SDXL base's UNet
and VAE, and diffusers' names and shapes of the same, built from diffusers alone.

The diffusers lists are diffusers' own full-size models (UNet2DConditionModel / AutoencoderKL with
SDXL's config) on the meta device. The official UNet names come from them through the rename
tables of diffusers' ``scripts/convert_diffusers_to_original_sdxl.py`` (written out below as
tables, not via fastflow's key maps), and the result is checked by running diffusers'
single-file converter (``convert_ldm_unet_checkpoint``) back: it must give exactly the diffusers
list. (That converter finds upsamplers by their ``conv`` name whatever their index, so the index,
2 after a ResBlock and a spatial transformer, rests on the table and sgm's layer order.) The VAE's
official names are the FLUX ``ae`` layout's (tests/data/vae_key_shapes.json) plus ``quant_conv``
/ ``post_quant_conv``, checked the same way with ``convert_ldm_vae_checkpoint``.

Run: python tools/sdxl_key_shapes.py  (needs diffusers; no network).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "sdxl_key_shapes.json"

# SDXL base 1.0's unet/config.json and vae/config.json (the fields that differ from diffusers' defaults)
UNET_CONFIG = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
VAE_CONFIG = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}


def _unet_renames() -> list[tuple[str, str]]:
    """(sgm prefix, diffusers prefix) pairs, as the conversion script lists them for 3 levels of 2
    ResNet blocks (attention from level 1 on)."""
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ]
    for i in range(3):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i > 0:
                pairs.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i < 2:
                pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 2:
            pairs.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            # after the ResBlock and the spatial transformer (both upsampling levels have attention)
            pairs.append((f"output_blocks.{3 * i + 2}.2.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def official_unet_name(diffusers_key: str, pairs) -> str:
    # the longest diffusers prefix that matches (up_blocks.0.upsamplers.0. before up_blocks.0.)
    sgm, hf = max(((s, h) for s, h in pairs if diffusers_key.startswith(h)), key=lambda p: len(p[1]))
    rest = diffusers_key[len(hf) :]
    if "resnets" in hf:
        for old, new in RESNET:
            rest = rest.replace(new, old)
    return sgm + rest


def main() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
    unet_hf = {k: list(v.shape) for k, v in unet.state_dict().items()}
    vae_hf = {k: list(v.shape) for k, v in vae.state_dict().items()}

    pairs = _unet_renames()
    unet_sgm = {official_unet_name(k, pairs): v for k, v in unet_hf.items()}
    assert len(unet_sgm) == len(unet_hf), "two diffusers tensors got one official name"
    back = convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: torch.empty(v, device="meta") for k, v in unet_sgm.items()}, dict(unet.config)
    )
    assert {k: list(v.shape) for k, v in back.items()} == unet_hf, "diffusers' converter disagrees (UNet)"

    ae = json.loads((OUT.parent / "vae_key_shapes.json").read_text())["vae_official"]
    vae_sgm = {k: None for k in ae} | {k: None for k in ("quant_conv.weight", "quant_conv.bias")}
    vae_sgm |= {k: None for k in ("post_quant_conv.weight", "post_quant_conv.bias")}
    # diffusers' converter names each official tensor's diffusers twin: tag tensor i by its size
    # (i + 1 rows), convert all at once, read the tags back
    tags = {k: torch.empty(i + 1, 1, 1, 1, device="meta") for i, k in enumerate(vae_sgm)}
    converted = convert_ldm_vae_checkpoint(tags, dict(vae.config))
    assert set(converted) == set(vae_hf), "diffusers' converter disagrees (VAE names)"
    twin = {list(vae_sgm)[t.shape[0] - 1]: k for k, t in converted.items()}
    for key in vae_sgm:
        shape = list(vae_hf[twin[key]])
        if key.startswith(("encoder.mid.attn_1.", "decoder.mid.attn_1.")) and len(shape) == 2:
            shape += [1, 1]  # diffusers keeps the 1x1 attention convs as Linear weights
        vae_sgm[key] = shape

    data = {
        "sdxl-base_official": {"model.diffusion_model." + k: v for k, v in sorted(unet_sgm.items())},
        "sdxl-base_diffusers": dict(sorted(unet_hf.items())),
        "sdxl-vae_official": {"first_stage_model." + k: v for k, v in sorted(vae_sgm.items())},
        "sdxl-vae_diffusers": dict(sorted(vae_hf.items())),
    }
    OUT.write_text(json.dumps(data, indent=0) + "\n")
    print(f"wrote {OUT} ({', '.join(f'{k}: {len(v)}' for k, v in data.items())})")


if __name__ == "__main__":
    main()
