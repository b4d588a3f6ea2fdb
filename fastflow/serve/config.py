"""What a ``fastflow serve`` process is configured with (:class:`ServeConfig`), checked once at start."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: only this machine can connect."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    """A server's settings. ``model``: what ``fastflow.load`` takes (an embedded model's name, a
    pipeline folder or a transformer file). Limits: ``max_batch`` images per pipeline call,
    ``max_queue`` requests waiting (more: 429), ``max_images`` per request (n), ``max_pixels``
    per image (width x height), ``max_steps``, ``max_body_bytes`` per request body (413 beyond),
    ``timeout_s`` per request from its arrival (504 beyond). ``loras``: name -> .safetensors path,
    loaded unfused at start; ``lora_dir``: a folder requests may name LoRAs under (relative
    paths only). ``compile`` / ``quant`` / ``cache``: as ``fastflow.accelerate``; ``cache`` is
    the default policy of requests that name none."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 4
    max_queue: int = 64
    batch_window_ms: float = 10.0
    api_key: str | None = None
    compile: bool = False
    quant: str | None = None
    cache: str | None = None
    lora_dir: str | None = None
    loras: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 300.0
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 2048 * 2048
    max_images: int = 8
    max_steps: int = 200
    device: str | None = None
    dtype: str | None = None
    variant: str | None = None
    log_level: str = "info"
    parallel: str | None = None  # under torchrun: the split, e.g. "ulysses=2" (serve/ranks.py)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Every field's type and range: a bad setting fails at start, with what to change."""
        if not isinstance(self.model, str) or not self.model:
            raise InputError(f"ServeConfig.model must be a model name or path, got {self.model!r}")
        ints = {"port": (0, 65535), "max_batch": (1, 64), "max_queue": (1, 1_000_000), "max_images": (1, 64),
                "max_body_bytes": (1024, 2**34), "max_pixels": (64, 2**30), "max_steps": (1, 10_000)}  # fmt: skip
        for name, (lo, hi) in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise InputError(f"ServeConfig.{name} must be an integer from {lo} to {hi}, got {value!r}")
        for name, lo in (("batch_window_ms", 0.0), ("timeout_s", 0.001)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise InputError(f"ServeConfig.{name} must be a number, got {value!r}")
            if value < lo:
                raise InputError(f"ServeConfig.{name} must be at least {lo}, got {value!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or len(self.api_key) < 8):
            raise InputError("ServeConfig.api_key must be a string of at least 8 characters (or None)")
        if self.quant not in (None, "fp8", "int8", "none"):
            raise InputError(f"ServeConfig.quant must be 'fp8', 'int8', 'none' or None, got {self.quant!r}")
        if not isinstance(self.loras, dict):
            raise InputError(f"ServeConfig.loras must be a dict of name -> path, got {type(self.loras).__name__}")
        for name, path in self.loras.items():
            if not isinstance(name, str) or not name or "/" in name or name != name.strip():
                raise InputError(f"ServeConfig.loras: {name!r} is not a LoRA name (no '/', no surrounding spaces)")
            if not Path(path).is_file():
                raise InputError(f"ServeConfig.loras[{name!r}]: {path} is not a file")
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise InputError(f"ServeConfig.lora_dir: {self.lora_dir} is not a folder")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)
