"""Key maps: how each tensor of our (official) layout is assembled from a checkpoint's tensors.

A target tensor is a concatenation along dim 0 of row ranges of source tensors (``Segment``):
fused q/k/v(/mlp) are several whole sources, a swapped adaLN is two halves of one source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    key: str
    half: int | None = None  # None: all rows; i: the i-th of ``parts`` equal row blocks (halves by default)
    unsqueeze: int = 0  # trailing singleton dims to add (diffusers squeezes 1x1 conv weights)
    parts: int = 2  # OpenCLIP's fused in_proj: thirds (q, k, v)
    transpose: bool = False  # a 2-D source stored the other way round (OpenCLIP's text_projection)

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of this piece, given its source tensor's shape (None: the source cannot give it)."""
        if self.transpose:
            return tuple(reversed(source_shape)) if len(source_shape) == 2 else None
        if not source_shape or (self.half is not None and source_shape[0] % self.parts):
            return None if self.half is not None or self.unsqueeze else source_shape
        rows = source_shape[0] // self.parts if self.half is not None else source_shape[0]
        return (rows, *source_shape[1:], *(1,) * self.unsqueeze)

    def take(self, src):
        """This piece of the source tensor (a view)."""
        if self.transpose:
            return src.t()
        if self.half is not None:
            n = src.shape[0] // self.parts
            src = src[self.half * n : (self.half + 1) * n]
        return src.reshape(*src.shape, *(1,) * self.unsqueeze) if self.unsqueeze else src


Plan = dict[str, list[Segment]]

# Prefixes under which all-in-one files (ComfyUI / SAI single files) hold each component.
COMPONENT_PREFIXES = {
    "transformer": ("model.diffusion_model.",),
    "vae": ("first_stage_model.", "vae."),
}
# Every prefix of a component some loader knows: in an all-in-one file, not errors.
OTHER_COMPONENT_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "vae.",
    "text_encoders.",
    "text_encoder.",
    "text_encoder_2.",
    "text_encoder_3.",
    "cond_stage_model.",
    "conditioner.",
    "model.diffusion_model_ema.",
)


def swap_halves(key: str) -> list[Segment]:
    """diffusers AdaLayerNormContinuous chunks (scale, shift); the official order is (shift, scale)."""
    return [Segment(key, 1), Segment(key, 0)]


def flux_from_diffusers(bfl_key: str, config=None) -> list[Segment]:
    """Sources, in diffusers FluxTransformer2DModel names, of one official FLUX tensor."""
    name, _, param = bfl_key.rpartition(".")
    simple = {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }
    if name in simple:
        return [Segment(f"{simple[name]}.{param}")]
    if name == "final_layer.adaLN_modulation.1":
        return swap_halves(f"norm_out.linear.{param}")
    m = re.fullmatch(
        r"double_blocks\.(\d+)\.(img|txt)_(mod\.lin|attn\.qkv|attn\.norm\.(query|key)_norm|"
        r"attn\.proj|mlp\.0|mlp\.2)",
        name,
    )
    if m:
        block, stream, part = f"transformer_blocks.{m[1]}", m[2], m[3]
        img = stream == "img"
        if part == "mod.lin":
            return [Segment(f"{block}.{'norm1' if img else 'norm1_context'}.linear.{param}")]
        if part == "attn.qkv":
            names = ("to_q", "to_k", "to_v") if img else ("add_q_proj", "add_k_proj", "add_v_proj")
            return [Segment(f"{block}.attn.{n}.{param}") for n in names]
        if part.startswith("attn.norm"):
            norm = ("norm_" if img else "norm_added_") + m[4][0]  # query -> q, key -> k
            return [Segment(f"{block}.attn.{norm}.weight")]
        if part == "attn.proj":
            return [Segment(f"{block}.attn.{'to_out.0' if img else 'to_add_out'}.{param}")]
        ff = "ff" if img else "ff_context"
        return [Segment(f"{block}.{ff}.{'net.0.proj' if part == 'mlp.0' else 'net.2'}.{param}")]
    m = re.fullmatch(r"single_blocks\.(\d+)\.(modulation\.lin|linear1|linear2|norm\.(query|key)_norm)", name)
    if m:
        block = f"single_transformer_blocks.{m[1]}"
        if m[2] == "modulation.lin":
            return [Segment(f"{block}.norm.linear.{param}")]
        if m[2] == "linear1":
            return [Segment(f"{block}.attn.{n}.{param}") for n in ("to_q", "to_k", "to_v")] + [
                Segment(f"{block}.proj_mlp.{param}")
            ]
        if m[2] == "linear2":
            return [Segment(f"{block}.proj_out.{param}")]
        return [Segment(f"{block}.attn.norm_{m[3][0]}.weight")]
    raise KeyError(f"no diffusers source known for FLUX tensor {bfl_key!r}")


def sd3_from_diffusers(key: str, config) -> list[Segment]:
    """Sources, in diffusers SD3Transformer2DModel names, of one official (SAI) MMDiT tensor."""
    name, _, param = key.rpartition(".")
    simple = {
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
        "context_embedder": "context_embedder",
        "final_layer.linear": "proj_out",
    }
    if key == "pos_embed":
        return [Segment("pos_embed.pos_embed")]
    if name in simple:
        return [Segment(f"{simple[name]}.{param}")]
    if name == "final_layer.adaLN_modulation.1":
        return swap_halves(f"norm_out.linear.{param}")
    m = re.fullmatch(r"joint_blocks\.(\d+)\.(x|context)_block\.(.+)", name)
    if not m:
        raise KeyError(f"no diffusers source known for SD3 tensor {key!r}")
    block, x, part = f"transformer_blocks.{m[1]}", m[2] == "x", m[3]
    if part == "adaLN_modulation.1":
        if x:
            return [Segment(f"{block}.norm1.linear.{param}")]
        if int(m[1]) == config.depth - 1:  # pre-only context block: AdaLayerNormContinuous order
            return swap_halves(f"{block}.norm1_context.linear.{param}")
        return [Segment(f"{block}.norm1_context.linear.{param}")]
    attn = re.fullmatch(r"(attn2?)\.(qkv|proj|ln_q|ln_k)", part)
    if attn:
        which, piece = attn[1], attn[2]
        if piece == "qkv":
            names = ("to_q", "to_k", "to_v") if x else ("add_q_proj", "add_k_proj", "add_v_proj")
            return [Segment(f"{block}.{which}.{n}.{param}") for n in names]
        if piece == "proj":
            return [Segment(f"{block}.{which}.{'to_out.0' if x else 'to_add_out'}.{param}")]
        norm = ("norm_" if x else "norm_added_") + piece[-1]
        return [Segment(f"{block}.{which}.{norm}.{param}")]
    ff = "ff" if x else "ff_context"
    if part in ("mlp.fc1", "mlp.fc2"):
        return [Segment(f"{block}.{ff}.{'net.0.proj' if part == 'mlp.fc1' else 'net.2'}.{param}")]
    raise KeyError(f"no diffusers source known for SD3 tensor {key!r}")


def vae_from_diffusers(key: str, config) -> list[Segment]:
    """Sources, in diffusers AutoencoderKL names, of one official (BFL ``ae``) VAE tensor."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return [Segment(key)]
    part, rest = key.split(".", 1)  # encoder | decoder
    top = len(config.ch_mult) - 1

    def resnet(tail):
        return tail.replace("nin_shortcut", "conv_shortcut")

    if rest.startswith("norm_out."):
        return [Segment(f"{part}.conv_norm_out.{rest[len('norm_out.') :]}")]
    if rest.startswith(("conv_in.", "conv_out.")):
        return [Segment(key)]
    if m := re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(.+)", rest):
        return [Segment(f"{part}.down_blocks.{m[1]}.resnets.{m[2]}.{resnet(m[3])}")]
    if m := re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(\w+)", rest):
        return [Segment(f"{part}.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}")]
    if m := re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(.+)", rest):  # up blocks are numbered in reverse
        return [Segment(f"{part}.up_blocks.{top - int(m[1])}.resnets.{m[2]}.{resnet(m[3])}")]
    if m := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(\w+)", rest):
        return [Segment(f"{part}.up_blocks.{top - int(m[1])}.upsamplers.0.conv.{m[2]}")]
    if m := re.fullmatch(r"mid\.block_([12])\.(.+)", rest):
        return [Segment(f"{part}.mid_block.resnets.{int(m[1]) - 1}.{resnet(m[2])}")]
    if m := re.fullmatch(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", rest):
        name = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[m[1]]
        squeezed = m[1] != "norm" and m[2] == "weight"  # 1x1 conv weights stored as Linear [C, C]
        return [Segment(f"{part}.mid_block.attentions.0.{name}.{m[2]}", unsqueeze=2 if squeezed else 0)]
    raise KeyError(f"no diffusers source known for VAE tensor {key!r}")


_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def unet_from_diffusers(key: str, config) -> list[Segment]:
    """Sources, in diffusers UNet2DConditionModel names, of one official (sgm) SDXL UNet tensor.

    Input block 0 is conv_in; level l's ResNet / transformer j is input block 1 + l * (n + 1) + j
    (n ResNet blocks a level) and its downsampler the block after; output block l * (n + 1) + j is
    up block l's j-th (levels counted from the lowest resolution), its upsampler the last layer of
    the level's last output block."""
    name, _, param = key.rpartition(".")
    per = config.num_res_blocks + 1
    simple = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1",
        "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    if name in simple:
        return [Segment(f"{simple[name]}.{param}")]

    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d)\.(.+)", name):
        i, index, rest = int(m[1]) - 1, int(m[2]), m[3]
        level, j = divmod(i, per)
        if j == config.num_res_blocks:  # the level's downsampler
            if rest == "op":
                return [Segment(f"down_blocks.{level}.downsamplers.0.conv.{param}")]
        elif index == 0 and rest in _RESNET_PARTS:
            return [Segment(f"down_blocks.{level}.resnets.{j}.{_RESNET_PARTS[rest]}.{param}")]
        elif index == 1:
            return [Segment(f"down_blocks.{level}.attentions.{j}.{rest}.{param}")]
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", name):
        index, rest = int(m[1]), m[2]
        if index in (0, 2) and rest in _RESNET_PARTS:
            return [Segment(f"mid_block.resnets.{index // 2}.{_RESNET_PARTS[rest]}.{param}")]
        if index == 1:
            return [Segment(f"mid_block.attentions.0.{rest}.{param}")]
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d)\.(.+)", name):
        level, j = divmod(int(m[1]), per)
        index, rest = int(m[2]), m[3]
        if index == 0 and rest in _RESNET_PARTS:
            return [Segment(f"up_blocks.{level}.resnets.{j}.{_RESNET_PARTS[rest]}.{param}")]
        if rest == "conv":
            return [Segment(f"up_blocks.{level}.upsamplers.0.conv.{param}")]
        if index == 1:
            return [Segment(f"up_blocks.{level}.attentions.{j}.{rest}.{param}")]
    raise KeyError(f"no diffusers source known for SDXL UNet tensor {key!r}")
