"""What several commands share: the --dtype names, the --device / --dtype defaults, and the
parsing of --cache, --lora and --threads (with the CPU thread count chosen from the model's size)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InputError
from ..ops.capability import usable_device

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_cache(text: str):
    """``--cache NAME[:THRESHOLD]`` or a schedule .json -> (cache, threshold)."""
    from ..caching import POLICIES

    if text.endswith(".json"):
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


def device_and_dtype(device: str | None, dtype: str | None = None) -> tuple[str, torch.dtype]:
    """--device (default: cuda if available) checked, and --dtype (default: bf16 on GPU, fp32 on CPU)."""
    device = usable_device(device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")
    return device, DTYPES[dtype] if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)


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


SMALL_MODEL_PARAMS = 50_000_000  # below this, matmuls are too small to share between cores


def cpu_threads(pipe) -> int:
    """Threads for a CPU run: 1 for small models, whose matmuls are too small to share between
    cores (issue 17 reported the embedded model 15x slower on 2 threads than on 1; re-measured on
    2 cores on 2026-12-04: denoise 0.13-0.15 s on 1 thread and 0.13-0.16 s on 2, so no loss today,
    and 1 thread leaves the other core free); torch's default (all cores) for real models."""
    params = sum(p.numel() for p in pipe.transformer.parameters())
    return 1 if params < SMALL_MODEL_PARAMS else torch.get_num_threads()


def threads_arg(value) -> int | None:
    """--threads, else FASTFLOW_NUM_THREADS, else None (chosen from the model's size)."""
    source = "--threads"
    if value is None and os.environ.get("FASTFLOW_NUM_THREADS"):
        value, source = os.environ["FASTFLOW_NUM_THREADS"], "FASTFLOW_NUM_THREADS"
    if value is None:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if not 1 <= threads <= 1024:
        raise InputError(f"{source} must be a thread count from 1 to 1024, got {value!r}")
    return threads


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
