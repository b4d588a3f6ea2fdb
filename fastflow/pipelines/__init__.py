"""Pipelines: prompt (and image) -> images, for FLUX.1 (incl. Kontext) and SD3 / SD3.5."""

from .base import PipelineOutput
from .flux import FluxPipeline
from .sd3 import SD3Pipeline

__all__ = ["FluxPipeline", "PipelineOutput", "SD3Pipeline"]
