"""LoRA on a pipeline's transformer (fastflow.adapters): load, switch, fuse, unload, list.

With ControlNets, a LoRA applies to the base model (transformer / UNet) only, as diffusers'
``load_lora_weights`` on its ControlNet pipelines (StableDiffusionXLControlNetPipeline,
StableDiffusion3ControlNetPipeline, FluxControlNetPipeline load into the UNet / transformer and the
text encoders, never into ``pipe.controlnet``): the nets keep their weights and add their residuals
to the LoRA'd model. A file with keys for a ControlNet's layers is refused, never half applied.
"""

from __future__ import annotations

import warnings

from ..errors import InputError, LoraError

# key parts that name a ControlNet's layers ("controlnet.", "controlnet_blocks", kohya "lora_controlnet_",
# SAI's control_model.): never the base model's
_CONTROLNET_PARTS = ("controlnet", "lora_controlnet", "control_model")


def controlnet_keys(keys) -> list[str]:
    """The keys that name a ControlNet's layers (they match no layer of the base model)."""
    return [k for k in keys if any(part.lower().startswith(_CONTROLNET_PARTS) for part in k.split("."))]


class LoraMixin:
    """A pipeline's LoRA methods; the adapters live in the transformer's LoraManager."""

    _lora = None  # the transformer's LoraManager, created by the first load_lora

    def load_lora(self, path, scale: float = 1.0, name: str | None = None, fuse: bool = False) -> str:
        """Load a LoRA file (diffusers / PEFT, kohya, BFL or XLabs format) onto the transformer and
        return its name (default: the file name without suffix). ``fuse=True`` adds it into the
        weights (no cost per step; ``unfuse_lora`` restores them exactly); otherwise it runs beside
        the layers and ``set_lora_scales`` switches it without recompiling a compiled model. Keys
        that match no layer are listed in a warning; a LoRA of another family or size is an error.
        With ControlNets the LoRA changes the base model only; a file with ControlNet keys is an error."""
        from ..adapters import LoraManager

        if self._lora is None:
            self._lora = LoraManager(self.transformer)
        with warnings.catch_warnings(record=True) as caught:  # held back: an error below replaces them
            warnings.simplefilter("always")
            adapter = self._lora.load(path, scale, name, fuse)
        keys = controlnet_keys(adapter.unmatched)
        if keys:  # never dropped silently: the LoRA comes off again (weights restored exactly)
            self._lora.unload(adapter.name)
            raise LoraError(
                adapter.path,
                f"{len(keys)} key(s) of this LoRA name a ControlNet's layers (first: {keys[0]}); fastflow applies "
                "a LoRA to the base model only, as diffusers' load_lora_weights",
                "load a LoRA of the base model; for a ControlNet LoRA, merge it into the ControlNet's weights and "
                "load that folder with controlnet=",
            )
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        return adapter.name

    def set_lora_scales(self, scales=None, **named) -> None:
        """``pipe.set_lora_scales({"style": 0.8, "detail": 0.0})`` (or as keywords); 0 switches one off."""
        if scales is not None and not isinstance(scales, dict):
            raise InputError(f"set_lora_scales takes a dict of LoRA name -> scale, got {type(scales).__name__}")
        self._loras().set_scales({**(scales or {}), **named})

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (or all): layers and weights are as before it was loaded."""
        self._loras().unload(name)

    def fuse_lora(self, names=None) -> None:
        """Fuse the loaded LoRAs (or ``names``) into the weights."""
        self._loras().set_fused(True, names)

    def unfuse_lora(self, names=None) -> None:
        """Back to running the LoRAs beside the layers; the base weights are restored bit for bit."""
        self._loras().set_fused(False, names)

    @property
    def loras(self) -> dict[str, dict]:
        """name -> {"scale", "fused", "layers", "unmatched"} of every loaded LoRA."""
        if self._lora is None:
            return {}
        return {
            n: {"scale": a.scale, "fused": a.fused, "layers": len(a.targets), "unmatched": list(a.unmatched)}
            for n, a in self._lora.adapters.items()
        }

    def _loras(self):
        if self._lora is None or not self._lora.adapters:
            raise InputError("no LoRA is loaded: pipe.load_lora(path) first")
        return self._lora
