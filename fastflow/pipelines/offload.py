"""Model CPU offload for GPUs of 12-24 GB: every component lives in CPU memory and moves to the GPU
only for the stage that runs it (text encoders for the prompt, the transformer and the ControlNets
for the conditioning table and the denoising loop, the VAE for encoding an input image and decoding), the previous one
going back to the CPU first. Peak GPU memory is the largest component plus activations instead of
all of them (FLUX.1-dev in bf16: 23.8 GB transformer, 9.5 GB T5, 0.2 GB VAE); the cost is one
host-to-device copy of each component per generation.

``pipe.enable_model_cpu_offload()`` (diffusers' name) turns it on; stages are marked in the
pipelines with ``pipe.stage(name)``. :class:`OffloadMixin` holds a pipeline's placement methods
(``to``, the offload switch, ``stage``, ``device``).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..errors import InputError
from .control import controlnets_of

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


class OffloadMixin:
    """Where a pipeline's components are and compute: ``pipe.to(...)``, model CPU offload on / off,
    the stage context, the execution device (the family gives ``weights_device``)."""

    _offload = None  # a ModelOffload while enable_model_cpu_offload is on

    def to(self, device=None, dtype: torch.dtype | None = None):
        """diffusers' ``pipe.to("cuda")`` / ``pipe.to(torch.bfloat16)`` / ``pipe.to("cuda", torch.bfloat16)``:
        moves (and casts) the transformer, its ControlNets, the VAE and the text encoders; returns the pipeline. T5
        is never cast to float16 (it overflows there): it keeps its dtype, with a warning."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if device is not None:
            from ..ops.capability import usable_device

            check_not_offloaded(self, "pipe.to(device)")
            device = torch.device(usable_device(device, "pipe.to", 'pipe.to("cpu")'))
        self.transformer.to(device=device, dtype=dtype)
        for net in controlnets_of(self):  # they run beside the transformer, on its device and dtype
            net.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        for name, model in text_models(self.text_encoder).items():
            cast = dtype
            if name == "t5" and dtype == torch.float16:
                warnings.warn("T5 overflows in float16: it keeps its dtype", UserWarning, stacklevel=2)
                cast = None
            model.to(device=device, dtype=cast)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device="cuda"):
        """diffusers' memory switch for 12-24 GB GPUs: each component stays in CPU memory and moves
        to ``device`` (``cuda:gpu_id``) only while its stage runs (see
        :mod:`fastflow.pipelines.offload`). Returns the pipeline."""
        from ..ops.capability import usable_device

        if gpu_id is not None:
            device = f"{torch.device(device).type}:{gpu_id}"
        if getattr(self, "_parallel", None) is not None:
            raise InputError(
                "model CPU offload cannot be combined with parallelism (each rank holds the whole model): "
                "call pipe.disable_parallelism() first"
            )
        device = torch.device(usable_device(device, "enable_model_cpu_offload", 'device="cpu"'))
        groups = {
            "text": list(text_models(self.text_encoder).values()),
            "transformer": self._transformer_group(),
            "vae": [self.vae],
        }
        self.disable_model_cpu_offload()
        self._offload = ModelOffload(groups, device)
        return self

    def disable_model_cpu_offload(self):
        """Turns the offload off; every component is left in CPU memory (then ``pipe.to(device)``)."""
        if self._offload is not None:
            self._offload.release()
        self._offload = None
        return self

    def stage(self, name: str):
        """Context of a pipeline stage ("text", "transformer", "vae"): with model CPU offload on,
        that component group is on the execution device for the block (the transformer's group
        includes the ControlNets)."""
        if self._offload is None:
            return contextlib.nullcontext()
        if self._offload.resident != "transformer":  # ControlNets attached after enable_model_cpu_offload
            self._offload.groups["transformer"] = self._transformer_group()
        return self._offload.use(name)

    def _transformer_group(self) -> list[nn.Module]:
        """The transformer stage's modules: the transformer and the ControlNets (run in its loop)."""
        return [self.transformer, *controlnets_of(self)]

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes: the transformer's device (with offload: the execution device)."""
        return self._offload.device if self._offload is not None else self.weights_device
