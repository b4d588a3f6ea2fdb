"""``fastflow.load()``: a pipeline from local files, never the network."""

from __future__ import annotations

import os

import torch

from .errors import InputError
from .loading import folder_json, load_components, resolve_model
from .loading.controlnet import load_controlnet
from .loading.svd import is_svd, load_svd
from .ops import capability
from .ops.capability import usable_device
from .parallel import launched
from .pipelines import FluxPipeline, SD3Pipeline, SDXLPipeline, canny  # noqa: F401  (canny: fastflow.canny)
from .pipelines.control import attach_controlnets
from .pipelines.svd import SVDPipeline
from .pipelines.video_export import export_video  # noqa: F401  (fastflow.export_video)

PIPELINES = {"flux": FluxPipeline, "sd3": SD3Pipeline, "sdxl": SDXLPipeline}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip


def _dtype(dtype) -> torch.dtype:
    """``dtype=`` as torch names it (torch.float16, "float16", "torch.float16") or by its short
    name ("fp16", "bf16", "half"); fastflow computes in float32, float16 or bfloat16."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.strip().lower().removeprefix("torch.")]
    raise InputError(f"fastflow.load: dtype={dtype!r} is not one fastflow computes in: use torch.float32, "
                     f"torch.bfloat16 or torch.float16 (or the names {', '.join(DTYPES)})")  # fmt: skip


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _rank_device(device: str) -> str:
    """Under torchrun, a bare "cuda" means this process's GPU (cuda:LOCAL_RANK), not every rank on GPU 0."""
    if device == "cuda" and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _load_video(path, variant, device, dtype, quant, vae, text_encoders, t5_max_length, config, nets):
    """Stable Video Diffusion (issue 36): an SVDPipeline where ``path`` holds SVD's files (a diffusers
    folder or an official single file: ``fastflow.loading.svd.is_svd``), else None. Arguments of
    the image families are refused for it."""
    if not is_svd(path):
        return None
    given = {"vae": vae, "text_encoders": text_encoders, "t5_max_length": t5_max_length, "config": config,
             "controlnet": nets or None}  # fmt: skip
    extra = [name for name, value in given.items() if value is not None]
    if extra:
        raise InputError(f"fastflow.load: {', '.join(extra)} do not apply to Stable Video Diffusion ({path}): its "
                         "folder or file holds every component")  # fmt: skip
    return SVDPipeline.from_components(load_svd(path, variant=variant, device=device, dtype=dtype, quant=quant))


CPU_DTYPE_FIELD = "_fastflow_cpu_dtype"  # model_index.json: the dtype a model keeps on a bf16 CPU


def default_dtype(path, device) -> torch.dtype:
    """bfloat16 on a GPU; on a CPU bfloat16 where it has native bf16 dot products (AVX512-BF16,
    AMX-BF16), else float32, and float32 where the pipeline folder's model_index.json says the
    model keeps it (``"_fastflow_cpu_dtype": "float32"``: its quality was measured to need it)."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    dtype = capability.cpu_default_dtype()
    if dtype == torch.bfloat16 and path.is_dir():
        kept = folder_json(path, "model_index.json").get(CPU_DTYPE_FIELD)
        if kept is not None:
            if not isinstance(kept, str) or kept.strip().lower() not in ("float32", "bfloat16"):
                raise InputError(f"{path / 'model_index.json'}: {CPU_DTYPE_FIELD} {kept!r} is not \"float32\" or "
                                 f"\"bfloat16\": fix the file, or pass dtype= to fastflow.load")  # fmt: skip
            dtype = DTYPES[kept.strip().lower()]
    return dtype


def load(
    path: str | os.PathLike,
    variant: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    vae: str | os.PathLike | None = None,
    text_encoders=None,
    t5_max_length: int | None = None,
    quant=None,
    config=None,
    controlnet=None,
):
    """A ready pipeline (FluxPipeline, SD3Pipeline, SDXLPipeline, or SVDPipeline for Stable Video
    Diffusion's image-to-video: docs/video.md) from local files.

    ``path``: the name of an embedded model (``"fastflow-tiny-digits"``), a diffusers pipeline folder
    (transformer/, vae/, text_encoder*/, tokenizer*/) or a single
    transformer file, with ``vae=`` (a file or folder) and ``text_encoders=`` ({"clip_l": folder,
    "clip_g": folder, "t5": folder}; a folder may be a (model, tokenizer) pair; False: none, for use
    with prompt embeddings). ``variant`` where the keys cannot tell (Kontext vs dev, large vs turbo).
    Sampling defaults come from the model's config. ``dtype`` defaults to bfloat16 on a GPU, and
    on a CPU to bfloat16 where it has native bf16 dot products (AVX512-BF16 / AMX-BF16; ``fastflow
    doctor`` says), else float32 (and float32 for a model whose folder asks for it). ``quant``: None
    keeps the transformer file's format (an FP8 file runs in FP8), "fp8" (or a
    :class:`fastflow.quant.Fp8Config`) quantizes its linear layers to FP8 while loading, "int8" (or an
    :class:`fastflow.quant.Int8Config`) to int8 W8A8 (half the memory; CUDA needs sm_80+), "none"
    loads FP8 / int8 files dequantized. ``config``: the transformer's config where no registered one
    fits and no diffusers config.json describes it (a FluxConfig / MMDiTConfig or a dict of its
    fields, e.g. ``{"depth": 2, "depth_single_blocks": 4}``).
    ``controlnet``: a ControlNet's diffusers folder, or a list of them (SDXL ControlNetModel, SD3
    SD3ControlNetModel, FLUX FluxControlNetModel incl. union models: ``control_mode=``), checked
    against the base model's family and widths before any weight is read; the pipeline then takes
    ``control_image=`` (pipelines/control.py).
    """
    device = str(usable_device(_rank_device(str(device if device is not None else _default_device())),
                               "fastflow.load: device", 'device="cpu"'))  # fmt: skip
    if dtype is not None:
        dtype = _dtype(dtype)
    path = resolve_model(path)
    nets = [] if controlnet is None else list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
    if dtype is None:  # the CLI passes None unless --dtype is given
        dtype = default_dtype(path, device)
    video = _load_video(path, variant, device, dtype, quant, vae, text_encoders, t5_max_length, config, nets)
    if video is not None:
        return video
    parts = load_components(path, variant, device, dtype, vae, text_encoders, t5_max_length, quant, config)
    pipe = PIPELINES[parts.family](parts.transformer, parts.vae, parts.text)
    if nets:
        attach_controlnets(pipe, [load_controlnet(p, parts.transformer.config, dtype, device, quant) for p in nets])
    if parts.family == "sdxl" and path.is_dir():  # the pipeline folder's SDXL setting, where it has one
        zeros = folder_json(path, "model_index.json").get("force_zeros_for_empty_prompt")
        if isinstance(zeros, bool):
            pipe.force_zeros_for_empty_prompt = zeros
    return pipe
