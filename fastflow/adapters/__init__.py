"""Adapters on fastflow transformers and the SDXL UNet: LoRA (diffusers / PEFT, kohya, BFL and
XLabs files), unfused beside the base layers or fused into the weights. Pipelines expose ``load_lora``,
``set_lora_scales``, ``unload_lora``, ``fuse_lora`` and ``unfuse_lora``."""

from .layers import LoraLinear
from .lora import LoraManager

__all__ = ["LoraLinear", "LoraManager"]
