"""What several commands share: the --dtype names, the --device / --dtype defaults, and the
parsing of --cache, --lora and --threads (with the CPU thread count chosen from the model's size)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..ops.capability import usable_device
from ..pipelines.threads import SMALL_MODEL_PARAMS, cpu_threads, env_threads

__all__ = ["DTYPES", "SMALL_MODEL_PARAMS", "cpu_threads", "device_and_dtype", "parse_cache", "parse_lora_arg",
           "threads_arg"]  # fmt: skip

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m")  # --sampler, and what --from accepts
MAX_UPSCALE = 64
MAX_SAVED_SIDE = 16384  # px per side of a saved image (after --upscale)


def parse_cache(text: str):
    """``--cache NAME[:THRESHOLD]`` or a schedule .json -> (cache, threshold)."""
    from ..caching import POLICIES

    if text.endswith(".json") or text.split(":")[0] == "deepcache":  # deepcache[:INTERVAL[:BRANCH]]: UNets
        return text, None
    name, _, threshold = text.partition(":")
    if name not in POLICIES:
        raise InputError(f"--cache {text}: use one of {', '.join(POLICIES)} (optionally NAME:THRESHOLD) or a .json")
    if not threshold:
        return name, None
    try:
        return name, float(threshold)
    except ValueError:
        raise InputError(f"--cache {text}: the threshold after ':' must be a number") from None


def device_and_dtype(device: str | None, dtype: str | None = None) -> tuple[str, torch.dtype | None]:
    """--device (default: cuda if available) checked, and --dtype; None when not given: then
    ``fastflow.load`` chooses (bf16 on a GPU; on a CPU bf16 where it has native bf16 dot products,
    else float32, or what the model's folder keeps)."""
    device = usable_device(device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")
    return device, DTYPES[dtype] if dtype else None


def parse_lora_arg(spec: str) -> tuple[Path, float]:
    """--lora PATH[:SCALE] -> (path, scale); the file must exist."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = spec
    if not Path(path).expanduser().is_file():
        raise InputError(f"--lora {path}: no such file")
    return Path(path).expanduser(), scale


def threads_arg(value) -> int | None:
    """--threads, else FASTFLOW_NUM_THREADS, else None (chosen from the model's size: cpu_threads)."""
    return env_threads(value, "--threads")


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {c: f"\\x{c:02x}" for c in range(0x80, 0xA0)}


def safe_text(text: str, limit: int = 2000) -> str:
    """``text`` fit for a terminal: whitespace runs collapsed to one space, every other control
    character (ESC sequences, bidi overrides) escaped as \\xNN / \\uNNNN, cut at ``limit``."""
    import unicodedata

    text = " ".join(str(text).split())
    out = "".join(
        ch.translate(_CONTROL)
        if ord(ch) < 0xA0
        else (f"\\u{ord(ch):04x}" if unicodedata.category(ch) in ("Cf", "Cs", "Co", "Cn") else ch)
        for ch in text[: limit + 1]
    )
    return out if len(text) <= limit else out[:limit] + "..."
