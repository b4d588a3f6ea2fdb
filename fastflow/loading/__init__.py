"""Checkpoint loading: safetensors I/O, format detection, key maps, validation."""

from .components import load_clip, load_t5
from .loader import CheckpointInfo, inspect_checkpoint, load_transformer, load_vae
from .sources import open_checkpoint

__all__ = [
    "CheckpointInfo",
    "inspect_checkpoint",
    "load_clip",
    "load_t5",
    "load_transformer",
    "load_vae",
    "open_checkpoint",
]
