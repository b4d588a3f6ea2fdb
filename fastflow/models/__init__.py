"""Model modules (official layouts) and their configs."""

from .configs import FluxConfig, from_name, list_models
from .flux import Flux

__all__ = ["Flux", "FluxConfig", "from_name", "list_models"]
