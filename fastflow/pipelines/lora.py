"""LoRA on a pipeline's transformer (fastflow.adapters): load, switch, fuse, unload, list."""

from __future__ import annotations

from ..errors import InputError


class LoraMixin:
    """A pipeline's LoRA methods; the adapters live in the transformer's LoraManager."""

    _lora = None  # the transformer's LoraManager, created by the first load_lora

    def load_lora(self, path, scale: float = 1.0, name: str | None = None, fuse: bool = False) -> str:
        """Load a LoRA file (diffusers / PEFT, kohya, BFL or XLabs format) onto the transformer and
        return its name (default: the file name without suffix). ``fuse=True`` adds it into the
        weights (no cost per step; ``unfuse_lora`` restores them exactly); otherwise it runs beside
        the layers and ``set_lora_scales`` switches it without recompiling a compiled model. Keys
        that match no layer are listed in a warning; a LoRA of another family or size is an error."""
        from ..adapters import LoraManager

        if self._lora is None:
            self._lora = LoraManager(self.transformer)
        return self._lora.load(path, scale, name, fuse).name

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
