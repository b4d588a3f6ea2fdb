"""Model CPU offload for GPUs of 12-24 GB: every component lives in CPU memory and moves to the GPU
only for the stage that runs it (text encoders for the prompt, the transformer for the conditioning
table and the denoising loop, the VAE for encoding an input image and decoding), the previous one
going back to the CPU first. Peak GPU memory is the largest component plus activations instead of
all of them (FLUX.1-dev in bf16: 23.8 GB transformer, 9.5 GB T5, 0.2 GB VAE); the cost is one
host-to-device copy of each component per generation.

``pipe.enable_model_cpu_offload()`` (diffusers' name) turns it on; stages are marked in the
pipelines with ``pipe.stage(name)``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import InputError

STAGES = ("text", "transformer", "vae")


class ModelOffload:
    """Which component group is on the execution device; moves groups on demand."""

    def __init__(self, groups: dict[str, list[nn.Module]], device: torch.device):
        self.groups, self.device = groups, device
        self.storage = torch.device("cpu")  # where groups wait
        self.resident: str | None = None
        for name in groups:
            self.move(name, self.storage)

    def move(self, name: str, device: torch.device) -> None:
        """Moves a group's modules (the one place a test can count moves)."""
        for module in self.groups[name]:
            module.to(device)

    @contextlib.contextmanager
    def use(self, name: str):
        """Within the block, group ``name`` is on the execution device (and no other group is)."""
        if name not in STAGES:
            raise ValueError(f"unknown offload stage {name!r}; stages: {STAGES}")
        if self.resident != name:
            if self.resident is not None:
                self.move(self.resident, self.storage)
                self.resident = None
            if self.groups.get(name):
                self.move(name, self.device)
                self.resident = name
        yield

    def release(self) -> None:
        """Back to the CPU (the end of a generation, as diffusers frees its hooks' models)."""
        if self.resident is not None:
            self.move(self.resident, self.storage)
            self.resident = None


def text_models(text_encoder) -> dict[str, nn.Module]:
    """role ("clip_l", "clip_g", "t5") -> model of a pipeline's text encoder (empty without one)."""
    return {n: getattr(text_encoder, n).model for n in ("clip_l", "clip_g", "t5") if getattr(text_encoder, n, None)}


def check_not_offloaded(pipe, what: str) -> None:
    if getattr(pipe, "_offload", None) is not None:
        raise InputError(f"{what}: model CPU offload is on; call pipe.disable_model_cpu_offload() first")
