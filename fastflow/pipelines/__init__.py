"""Pipelines: prompt (and image) -> images, for FLUX.1 (incl. Kontext), SD3 / SD3.5 and SDXL; image ->
video for Stable Video Diffusion."""

from .flux import FluxPipeline
from .images import canny
from .outputs import PipelineOutput
from .sd3 import SD3Pipeline
from .sdxl import SDXLPipeline
from .svd import SVDPipeline

__all__ = ["FluxPipeline", "canny", "PipelineOutput", "SD3Pipeline", "SDXLPipeline", "SVDPipeline"]
