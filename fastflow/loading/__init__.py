"""Checkpoint loading: safetensors I/O, format detection, key maps, validation."""

from .loader import CheckpointInfo, inspect_checkpoint, load_transformer
from .sources import open_checkpoint

__all__ = ["CheckpointInfo", "inspect_checkpoint", "load_transformer", "open_checkpoint"]
