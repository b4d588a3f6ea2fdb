"""Model modules (official layouts) and their configs."""

from . import configs_svd  # noqa: F401  (registers the SVD configs: svd, svd-xt, svd-tiny)
from .configs import FluxConfig, MMDiTConfig, VAEConfig, from_name, list_models
from .flux import Flux
from .mmdit import MMDiT
from .vae import AutoEncoder

__all__ = ["AutoEncoder", "VAEConfig", "MMDiT", "MMDiTConfig", "Flux", "FluxConfig", "from_name", "list_models"]
