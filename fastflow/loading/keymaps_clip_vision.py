"""Key map of the CLIP image encoder (models/clip_vision.py, transformers' names) from open_clip's
vision-tower layout, as the official Stable Video Diffusion single files (svd.safetensors,
svd_xt.safetensors, svd_xt_1_1.safetensors: Stability's sgm checkpoints) hold it under
``conditioner.embedders.0.open_clip.model.visual.``.

The open_clip names and the prefix are INFERRED, not read from a real file: they come from
ComfyUI's converter (``comfy/clip_vision.py`` ``convert_to_transformers`` with the
``SVD_img2vid.clip_vision_prefix`` of ``comfy/supported_models.py``) and open_clip's
``VisionTransformer`` layout (marked [I] in the SVD facts collected for issue 36). Check them once
against a real file's header before relying on them.

    class_embedding                       -> vision_model.embeddings.class_embedding
    conv1.weight                          -> vision_model.embeddings.patch_embedding.weight
    positional_embedding                  -> vision_model.embeddings.position_embedding.weight
    ln_pre / ln_post                      -> vision_model.pre_layrnorm / vision_model.post_layernorm
    transformer.resblocks.N.*             -> vision_model.encoder.layers.N.* (q / k / v = thirds of
                                             the fused attn.in_proj_{weight,bias}; the text tower's map)
    proj [width, projection]              -> visual_projection.weight, transposed
"""

from __future__ import annotations

import dataclasses

from .keymaps import Plan, Segment
from .text import openclip_source

# Where sgm's SVD checkpoints keep the vision tower ([I], see above).
SVD_OPENCLIP_VISUAL_PREFIX = "conditioner.embedders.0.open_clip.model.visual."

_SIMPLE = {
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
}
_LAYERS = "vision_model.encoder.layers."


def clip_vision_from_openclip(key: str) -> list[Segment]:
    """Sources, in open_clip's vision-tower names (without a prefix), of one tensor of our CLIP image
    encoder."""
    if key in _SIMPLE:
        return [Segment(_SIMPLE[key])]
    if key == "visual_projection.weight":
        return [Segment("proj", transpose=True)]  # open_clip computes x @ proj: stored [width, projection]
    if key.startswith(_LAYERS):  # the same resblock layout as open_clip's text tower
        return [openclip_source(key.removeprefix("vision_model."))]
    raise KeyError(f"no open_clip source known for CLIP vision tensor {key!r}")


def clip_vision_openclip_plan(model_keys, prefix: str = SVD_OPENCLIP_VISUAL_PREFIX) -> Plan:
    """Our module's keys -> their pieces in a file holding open_clip's vision tower under ``prefix``."""
    return {k: [dataclasses.replace(s, key=prefix + s.key) for s in clip_vision_from_openclip(k)] for k in model_keys}
