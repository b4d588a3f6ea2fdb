"""Write a transformer as an FP8 or int8 safetensors file (``fastflow quantize``): official names,
e4m3 (or int8) weights with their ``weight_scale`` next to them, layers the config skips in the
model dtype, and ``__metadata__`` naming the format, so the file loads back bit for bit (quant=None
keeps it FP8 / int8)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import OutputError
from ..quant import Fp8Config, Int8Config, fp8_layers, int8_layers
from .files import file_mode
from .loader import load_transformer
from .quantized import ACTIVATION_KEY, FORMAT, FORMAT_INT8, FORMAT_KEY
from .source import open_checkpoint


def quantize_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: Fp8Config | Int8Config | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Quantize the transformer at ``src`` (any layout fastflow loads) into the single file ``dst``
    (never overwritten; written to a temporary file first). Returns a summary dict."""
    config = config or Fp8Config()
    dst = Path(dst)
    if not dst.parent.is_dir():
        raise OutputError(f"{dst.parent} is not a folder: create it first")
    try:  # claim the name before any work: a file that appears meanwhile is never overwritten
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        raise OutputError(f"{dst} exists: choose another output path (fastflow quantize never overwrites)") from None
    except OSError as e:
        raise OutputError(f"cannot write {dst} ({e.strerror}): choose a folder you can write") from None
    try:
        kind = "int8" if isinstance(config, Int8Config) else "FP8"  # the codes alone take a byte per weight
        _check_space(dst, _weights_in(src), f"the {kind} file needs at least ")
        return _quantize_into(src, dst, config, variant, dtype)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(dst)  # the claim (the temporary removes itself)
        raise


def _weights_in(src) -> int:
    """How many weights the checkpoint holds (its headers only)."""
    with open_checkpoint(src) as source:
        return sum(math.prod(e.shape) for f in source.files for e in f.entries.values())


def _check_space(dst: Path, need: int, what: str) -> None:
    """Refuse before the work (and again before the write) when the folder's disk cannot hold it."""
    free = shutil.disk_usage(dst.parent).free
    if free < need:
        raise OutputError(
            f"{dst.parent} has {free / 2**30:.2f} GiB free; {what}{need / 2**30:.2f} GiB: "
            "free some space or write elsewhere"
        )


def _quantize_into(src, dst: Path, config: Fp8Config | Int8Config, variant, dtype) -> dict:
    model = load_transformer(src, variant=variant, dtype=dtype, device="cpu", quant=config)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # int8 codes: row-major on disk
    int8 = isinstance(config, Int8Config)
    metadata = {
        FORMAT_KEY: FORMAT_INT8 if int8 else FORMAT,
        ACTIVATION_KEY: config.activation,
        "fastflow.weight": config.weight,
        "fastflow.variant": model.config.name,
        "fastflow.skip": ",".join(config.skip),
    }
    need = sum(v.numel() * v.element_size() for v in state.values())
    _check_space(dst, need, f"the {metadata[FORMAT_KEY]} file needs ")
    fd, tmp = tempfile.mkstemp(prefix=".fastflow-quantize-", suffix=".safetensors", dir=dst.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; the user's umask decides
        os.close(fd)
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, dst)  # over the claim
    except OSError as e:
        raise OutputError(f"cannot write {dst}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {
        "variant": model.config.name,
        "format": FORMAT_INT8 if int8 else FORMAT,
        "layers": len(int8_layers(model) if int8 else fp8_layers(model)),
        "fp8_layers": len(fp8_layers(model)),
        "bytes": sum(v.numel() * v.element_size() for v in state.values()),
        "path": str(dst),
    }
