"""Checkpoint loading from local files, as one-way stages (ARCHITECTURE.md):

    source (source.py)           a name or path -> CheckpointSource: files validated, headers only
    description (describe.py)    -> Description: family, layout, config (families.py, probes.py, variant.py)
    plan (plan.py)               -> LoadPlan: the module on meta, FP8 layers, key map, all validated
    materialize (materialize.py) -> the module, tensor by tensor

loader.py runs them for a transformer or a VAE; text.py for CLIP / T5; components.py gathers a
pipeline's parts; svd.py Stable Video Diffusion's (UNet, temporal VAE, image encoder).
"""

from .components import load_clip, load_components, load_t5
from .describe import Description, describe
from .described import parse_config_arg
from .loader import CheckpointInfo, human_bytes, inspect_checkpoint, load_transformer, load_vae
from .materialize import materialize
from .plan import LoadPlan, make_plan
from .source import DEFAULT_MODEL, CheckpointSource, folder_json, open_checkpoint, resolve_model
from .svd import SVDComponents, is_svd, load_svd
from .writer import quantize_checkpoint

__all__ = [
    "DEFAULT_MODEL",
    "CheckpointInfo",
    "CheckpointSource",
    "Description",
    "LoadPlan",
    "SVDComponents",
    "describe",
    "folder_json",
    "human_bytes",
    "inspect_checkpoint",
    "is_svd",
    "load_clip",
    "load_components",
    "load_svd",
    "load_t5",
    "load_transformer",
    "load_vae",
    "make_plan",
    "materialize",
    "open_checkpoint",
    "parse_config_arg",
    "quantize_checkpoint",
    "resolve_model",
]
