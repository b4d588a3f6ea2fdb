"""fastflow: fast FLUX.1 and Stable Diffusion 3/3.5 inference."""

__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers the fastflow:: custom ops)
from .api import canny, export_video, load  # noqa: E402
from .compile import accelerate  # noqa: E402
from .loading import inspect_checkpoint, load_transformer, load_vae  # noqa: E402
from .models.configs import list_models  # noqa: E402

__all__ = [
    "__version__",
    "accelerate",
    "canny",
    "export_video",
    "inspect_checkpoint",
    "list_models",
    "load",
    "load_transformer",
    "load_vae",
    "ops",
]
