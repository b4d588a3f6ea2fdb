"""LoRA on a pipeline's transformer (fastflow.adapters): load, switch, fuse, unload, list.

With ControlNets, a LoRA applies to the base model (transformer / UNet) only, as diffusers'
``load_lora_weights`` on its ControlNet pipelines (StableDiffusionXLControlNetPipeline,
StableDiffusion3ControlNetPipeline, FluxControlNetPipeline load into the UNet / transformer and the
text encoders, never into ``pipe.controlnet``): the nets keep their weights and add their residuals
to the LoRA'd model. A file with keys for a ControlNet's layers is refused, never half applied.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import InputError, LoraError
from ..models import configs as registry

# key parts that name a ControlNet's layers ("controlnet.", "controlnet_blocks", kohya "lora_controlnet_",
# SAI's control_model.): never the base model's
_CONTROLNET_PARTS = ("controlnet", "lora_controlnet", "control_model")

# load_lora(variant=): which FLUX.1 control model a Canny / Depth LoRA makes of dev
_CONTROL_VARIANTS = {"canny": "canny", "depth": "depth", "flux-canny-dev": "canny", "flux-depth-dev": "depth"}


def controlnet_keys(keys) -> list[str]:
    """The keys that name a ControlNet's layers (they match no layer of the base model)."""
    return [k for k in keys if any(part.lower().startswith(_CONTROLNET_PARTS) for part in k.split("."))]


class LoraMixin:
    """A pipeline's LoRA methods; the adapters live in the transformer's LoraManager."""

    _lora = None  # the transformer's LoraManager, created by the first load_lora
    _before_control = None  # (adapter name, config, defaults) while a FLUX.1 control LoRA is loaded

    def load_lora(
        self, path, scale: float = 1.0, name: str | None = None, fuse: bool = False, variant: str | None = None
    ) -> str:
        """Load a LoRA file (diffusers / PEFT, kohya, BFL or XLabs format) onto the transformer and
        return its name (default: the file name without suffix). ``fuse=True`` adds it into the
        weights (no cost per step; ``unfuse_lora`` restores them exactly); otherwise it runs beside
        the layers and ``set_lora_scales`` switches it without recompiling a compiled model. Keys
        that match no layer are listed in a warning; a LoRA of another family or size is an error.
        With ControlNets the LoRA changes the base model only; a file with ControlNet keys is an error.

        BFL's FLUX.1-Canny-dev-lora / FLUX.1-Depth-dev-lora make FLUX.1 dev a Canny / Depth model
        (img_in widened, norm scales replaced, as diffusers' load_lora_weights): the pipeline then
        takes ``control_image=`` with that model's defaults; Depth where the file name or metadata
        says so, else Canny (``variant="depth"`` / ``"canny"`` to say). ``unload_lora`` restores dev."""
        return self._load_lora(path, scale, name, fuse, variant)

    def _load_lora(self, path, scale, name, fuse, variant=None, text_encoder: str = "warn") -> str:
        """load_lora's work; ``text_encoder``: what the file's text-encoder keys do (LoraManager.load)."""
        from ..adapters import LoraManager

        kind = _control_variant(variant)
        if self._lora is None:
            self._lora = LoraManager(self.transformer)
        with warnings.catch_warnings(record=True) as caught:  # held back: an error below replaces them
            warnings.simplefilter("always")
            adapter = self._lora.load(
                path, scale, name, fuse, on_control=lambda parts: self._check_control(parts, path),
                text_encoder=text_encoder,
            )  # fmt: skip
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
        if adapter.control is None or adapter.control.width is None:
            if variant is not None:
                self._lora.unload(adapter.name)
                raise InputError(f"variant= is for FLUX.1 Canny / Depth LoRAs; {Path(path).name} is not one "
                                 "(nothing was loaded)")  # fmt: skip
            return adapter.name
        self._become_control(adapter, kind)
        return adapter.name

    def set_lora_scales(self, scales=None, **named) -> None:
        """``pipe.set_lora_scales({"style": 0.8, "detail": 0.0})`` (or as keywords); 0 switches one off."""
        if scales is not None and not isinstance(scales, dict):
            raise InputError(f"set_lora_scales takes a dict of LoRA name -> scale, got {type(scales).__name__}")
        self._loras().set_scales({**(scales or {}), **named})

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (or all): layers and weights are as before it was loaded (a control
        LoRA's FLUX.1 dev back: img_in, norm scales, config and defaults)."""
        self._loras().unload(name)
        if self._before_control is not None and self._before_control[0] not in self._lora.adapters:
            _, config, defaults = self._before_control
            self.transformer.config = self.config = config
            self.defaults = defaults
            self._before_control = None

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

    def _check_control(self, parts, path) -> None:
        """A control LoRA that widens img_in turns FLUX.1 dev into Canny / Depth: refused elsewhere."""
        from .control import controlnets_of

        config = self.config
        if parts.width is None:
            return
        what = ("a Kontext model" if config.kontext else f"a FLUX.1 {config.conditioning} model" if config.conditioning
                else "a model without guidance embedding (schnell)" if not config.guidance_embed else None)  # fmt: skip
        if what is not None:
            raise LoraError(path, f"a FLUX.1 Canny / Depth LoRA is for FLUX.1 dev, but {config.name} is {what}",
                            "load it on FLUX.1 dev")  # fmt: skip
        if controlnets_of(self):
            raise LoraError(path, "a FLUX.1 Canny / Depth LoRA on a pipeline with ControlNets",
                            "load the pipeline without controlnet= to use the control LoRA")  # fmt: skip

    def _become_control(self, adapter, kind: str | None) -> None:
        """The config and sampling defaults of the FLUX.1 control model the LoRA makes of dev."""
        old = self.config
        if kind is None:
            kind = "depth" if "depth" in adapter.control.hint else "canny"
            if "depth" not in adapter.control.hint and "canny" not in adapter.control.hint:
                warnings.warn(
                    f"{adapter.path.name}: a FLUX.1 control LoRA that nothing names Canny or Depth; loading it as "
                    "Canny (pass variant='depth' for Depth's default guidance)",
                    UserWarning,
                    stacklevel=3,
                )
        width = adapter.control.width
        sampling = registry.flux_conditioned_sampling(width, old.out_channels, depth=kind == "depth")
        new = old.replace(in_channels=width, sampling=sampling)
        same = [c.name for c in registry.configs_of("flux") if c.replace(name=old.name) == new and kind in c.name]
        new = new.replace(name=same[0] if same else f"{old.name}+{kind}-lora")
        self._before_control = (adapter.name, old, self.defaults)
        self.transformer.config = self.config = new
        self.defaults = sampling.as_dict()

    def _loras(self):
        if self._lora is None or not self._lora.adapters:
            raise InputError("no LoRA is loaded: pipe.load_lora(path) first")
        return self._lora


def _control_variant(variant) -> str | None:
    if variant is None:
        return None
    if not isinstance(variant, str) or variant.lower() not in _CONTROL_VARIANTS:
        raise InputError(f"load_lora variant= must be one of {', '.join(_CONTROL_VARIANTS)} (FLUX.1 control "
                         f"LoRAs), got {variant!r}")  # fmt: skip
    return _CONTROL_VARIANTS[variant.lower()]
