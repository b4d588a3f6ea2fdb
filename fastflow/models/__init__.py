"""Model modules (official layouts) and their configs."""

from .configs import FluxConfig, MMDiTConfig, from_name, list_models
from .flux import Flux
from .mmdit import MMDiT

__all__ = ["MMDiT", "MMDiTConfig", "Flux", "FluxConfig", "from_name", "list_models"]
