"""Stage 2 of loading, the description: an opened :class:`~.source.CheckpointSource` (and the
user's ``family=`` / ``variant=`` / ``config=``) -> a :class:`Description`: which family the
component is, how its keys are laid out (naming, prefix), and the config of the module it fills.

The family and naming come from the key names (:func:`.families.identify`), the architecture from
tensor shapes (the family's probes), the config from the registry, ``variant=`` / ``config=``, the
file's metadata or a diffusers ``config.json`` (:mod:`.variant`). Headers only: no weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FamilyMismatchError
from ..models import configs as registry
from .families import FAMILIES, FAMILY_NAMES, MISMATCH_HINTS, FamilySpec, families_of, identify
from .layout import Layout, split_keys
from .source import CheckpointSource
from .variant import resolve_config


@dataclass(frozen=True)
class Description:
    """What a checkpoint component is; :mod:`.plan` turns it into a load plan."""

    family: str  # a key of FAMILIES
    layout: Layout  # naming, prefix and the component's keys
    config: object  # the module's config (FluxConfig, MMDiTConfig, UNetConfig, VAEConfig)

    @property
    def spec(self) -> FamilySpec:
        return FAMILIES[self.family]


def detect_layout(keys, component: str = "transformer") -> Layout:
    """Split a checkpoint's keys into the component's own (prefix stripped), other known
    components' (all-in-one files) and foreign ones; name the family and naming of the rest."""
    prefix, mine, other, foreign, quant = split_keys(keys, component)
    family, naming = identify(mine) if mine else identify(other)
    return Layout(family, naming, prefix, tuple(mine), tuple(other), tuple(foreign), tuple(quant))


def _check_family(source: CheckpointSource, layout: Layout, family: str) -> None:
    if layout.family != family:
        hint = MISMATCH_HINTS.get(layout.family, "check that the path points to the transformer weights")
        raise FamilyMismatchError(
            source.path, f"this is {FAMILY_NAMES[layout.family]}, not {FAMILY_NAMES[family]}", hint
        )


def describe(
    source: CheckpointSource,
    component: str,
    family: str | None = None,
    variant: str | None = None,
    config=None,
    prefer: str | None = None,
) -> Description:
    """The family (``family=``, else the one ``config=`` / ``variant=`` names, else the detected
    one if this component can be it), checked against the keys; then the config, checked against
    the tensors (``prefer``: the pipeline's family, settling a VAE's latent scale)."""
    layout = detect_layout(source.key_file, component)
    if family is None and (config is not None or variant is not None) and not isinstance(config, dict):
        family = (config if config is not None else registry.from_name(variant)).family
    if family is None:  # auto: the detected family if this component has it, else the first
        families = families_of(component)
        family = layout.family if layout.family in families else families[0]
    _check_family(source, layout, family)
    spec = FAMILIES[family]
    cfg = resolve_config(family, spec.arch(source, layout), source, variant, config, layout, prefer)
    return Description(family, layout, cfg)
