"""Checkpoint loading: safetensors I/O, format detection, key maps, validation."""

from .loader import CheckpointInfo, inspect_checkpoint, load_transformer, load_vae
from .sources import open_checkpoint

__all__ = ["CheckpointInfo", "inspect_checkpoint", "load_transformer", "load_vae", "open_checkpoint"]
